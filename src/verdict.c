#include "verdict.h"

const char *verdict_name(verdict_kind_t k)
{
    return k == VERDICT_RETRY ? "retry" : k == VERDICT_RESPOND ? "respond" : "pass";
}

void verdict_reset(verdict_t *v)
{
    buf_free(&v->headers);
    buf_free(&v->body);
    *v = (verdict_t)VERDICT_INIT;
}
