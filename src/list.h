/* list: an intrusive doubly-linked list (a node embedded in its owner). */
#ifndef ERRORD_LIST_H
#define ERRORD_LIST_H

#include <stddef.h>

typedef struct list_s {
    struct list_s *prev;
    struct list_s *next;
} list_t;

/* The struct of type `type` whose member `field` is the node `ptr`. */
#define list_entry(ptr, type, field) ((type *)((char *)(ptr) - offsetof(type, field)))

#define list_for_each_safe(pos, tmp, head) \
    for ((pos) = (head)->next, (tmp) = (pos)->next; (pos) != (head); (pos) = (tmp), (tmp) = (pos)->next)

static inline void list_init(list_t *l) { l->prev = l->next = l; }
static inline int list_empty(const list_t *l) { return l->next == l; }

static inline void list_push_front(list_t *head, list_t *n)
{
    n->next = head->next;
    n->prev = head;
    head->next->prev = n;
    head->next = n;
}

static inline void list_push_back(list_t *head, list_t *n)
{
    n->prev = head->prev;
    n->next = head;
    head->prev->next = n;
    head->prev = n;
}

/* Unlinks `n` and leaves it as an empty list, so removing twice is safe. */
static inline void list_remove(list_t *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    list_init(n);
}

#endif
