"""Shared by the deploy tests that start real servers (tls_chain_test.py,
api_keys_test.py): the failure list, a started server that reports the
addresses it prints and is stopped on every path, and the closing line."""
import re
import signal
import subprocess
import threading

SKIP = 77  # ctest SKIP_RETURN_CODE of these tests
failures = []


def check(cond, message):
    """Records message as a failure unless cond; returns cond."""
    if not cond:
        failures.append(message)
    return cond


class Server:
    """A server process started from argv, its output read on a thread.
    addrs maps each "<program> <what> on 127.0.0.1:PORT" line's <what> to its
    address; the constructor returns once every name in wants was printed, or
    raises RuntimeError (with the output's tail) when the output ends or
    timeout seconds pass first, after stopping the process. stop() is
    idempotent: SIGTERM, then SIGKILL after 40 s (recorded as a failure)."""

    def __init__(self, name, argv, wants, timeout=120):
        self.name = name
        self.lines = []
        self.addrs = {}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        done = threading.Event()  # every wanted line seen, or the output ended

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.match(r"\S+ (\w+) on (127\.0\.0\.1:\d+)", line)
                if m:
                    self.addrs.setdefault(m.group(1), m.group(2))
                    if all(w in self.addrs for w in wants):
                        done.set()
            done.set()

        threading.Thread(target=read, daemon=True).start()
        done.wait(timeout=timeout)
        if not all(w in self.addrs for w in wants):
            self.stop()
            raise RuntimeError(f"{name} did not start with the chart's arguments:\n"
                               + "".join(self.lines[-20:]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                failures.append(f"{self.name} did not stop within 40 s of SIGTERM")


def finish(name):
    """Prints every failure and the closing line; returns the exit status."""
    for f in failures:
        print("FAIL:", f)
    print(f"{name}: {'FAILED (%d)' % len(failures) if failures else 'passed'}")
    return 1 if failures else 0
