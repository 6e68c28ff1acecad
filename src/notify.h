/* notify: tells the service manager how errord is doing (systemd's
 * Type=notify protocol, sd_notify(3)): a datagram of "KEY=value" lines to the
 * unix socket named by $NOTIFY_SOCKET, without linking libsystemd. Without
 * the variable, as outside systemd, nothing is sent. */
#ifndef ERRORD_NOTIFY_H
#define ERRORD_NOTIFY_H

/* Sends `state` ("READY=1", "RELOADING=1", "STOPPING=1"...). Returns 0 when
 * it was sent or there is nobody to tell, a negative errno otherwise. */
int notify(const char *state);

#endif
