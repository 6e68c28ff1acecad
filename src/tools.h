/* tools: errord's offline commands (SPEC §1), which work on a policy file
 * without running the proxy:
 *
 *   errord check POLICY                      load, validate and test it
 *   errord test POLICY [CASES.json]          run its tests and extra cases
 *   errord replay POLICY LOG.jsonl [--against OLD]
 *                                            what it decides for recorded traffic
 *
 * Exit status: 0 when all is well, 1 when the policy has problems or a case
 * fails, 2 for a bad command line. */
#ifndef ERRORD_TOOLS_H
#define ERRORD_TOOLS_H

/* Whether `name` is one of the commands. */
int tools_has(const char *name);

/* Runs the command argv[0] with its arguments; returns the exit status. */
int tools_main(int argc, char **argv);

#endif
