/* The pod sandbox's process (the "pause" image of the test cluster): it holds
 * the pod's namespaces, reaps orphans, and exits on SIGTERM/SIGINT. Built with
 * gcc -static, so its image is this one file. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
  signal(SIGTERM, quit);
  signal(SIGINT, quit);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
