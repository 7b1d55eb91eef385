"""Fuzzes every registered tf_lora op: thousands of generated raw-op calls (fuzz_worker.py says what a case
is), each in a worker process that may die. A worker that dies (a crash) or stops answering (a hang) is a
failure, and so is a wrong accepted result or a refused call that changed a table or a variable. A new op is
fuzzed the day it lands: ops are found in the generated modules, and one with no entry in fuzz_templates.py
fails here.

Seeded and bounded: TF_LORA_FUZZ_SEED (default fixed), TF_LORA_FUZZ_CASES (default 5000) and
TF_LORA_FUZZ_SECONDS (default 300: stop early, never run long). A failing case replays alone with the command
the failure prints.
"""

import json
import os
import pathlib
import select
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "fuzz_worker.py"
SEED = int(os.environ.get("TF_LORA_FUZZ_SEED", "20261129"))
CASES = int(os.environ.get("TF_LORA_FUZZ_CASES", "5000"))
SECONDS = float(os.environ.get("TF_LORA_FUZZ_SECONDS", "300"))
WORKERS = 2
START_TIMEOUT = 180  # importing TensorFlow on a loaded 2-core machine
CASE_TIMEOUT = 60  # a case takes milliseconds; this only tells a hang


class WorkerGone(Exception):
    pass


class Worker:
    """One worker process, talking lines over pipes; its stderr goes to a log kept for crash reports."""

    def __init__(self, log_path):
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--seed", str(SEED)],
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        self.buffer = b""
        line = self.readline(START_TIMEOUT)
        assert line.startswith("READY "), f"worker did not start: {line!r}\n{self.stderr_tail()}"
        self.ops = json.loads(line[len("READY ") :])

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerGone(f"hang: no answer in {timeout} s")
            data = os.read(fd, 1 << 16)
            if not data:
                self.proc.wait(timeout=30)
                raise WorkerGone(f"crash: the worker died with exit status {self.proc.returncode}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def run(self, case):
        try:
            self.proc.stdin.write(f"{case}\n".encode())
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise WorkerGone("crash: the worker's input closed") from e
        while True:
            line = self.readline(CASE_TIMEOUT)
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])

    def stderr_tail(self):
        self.log.flush()
        return self.log_path.read_bytes()[-2000:].decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def test_every_op_survives_the_fuzzer(tmp_path):
    next_case, lock = iter(range(CASES)), threading.Lock()
    results, failures, ops = [], [], []
    deadline = time.monotonic() + SECONDS

    def slot(k):
        worker = Worker(tmp_path / f"worker{k}.log")
        ops.append(worker.ops)
        while time.monotonic() < deadline:
            with lock:
                case = next(next_case, None)
            if case is None:
                break
            try:
                result = worker.run(case)
            except WorkerGone as e:
                failures.append(
                    {"case": case, "problem": f"{e}; its stderr ended with:\n{worker.stderr_tail()}"}
                )
                worker.stop()
                worker = Worker(tmp_path / f"worker{k}.{case}.log")
                continue
            results.append(result)
            if result["problem"] or result["outcome"] not in ("accepted", "refused", "setup_refused"):
                failures.append(result)
        worker.stop()

    threads = [threading.Thread(target=slot, args=(k,)) for k in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    replay = f"cd tests/fuzz && python fuzz_worker.py --seed {SEED} --case CASE"
    report = "\n".join(json.dumps(f, default=str)[:3000] for f in failures[:20])
    assert not failures, f"{len(failures)} failing cases (replay one: {replay}):\n{report}"

    names = [op for op in ops[0] if not op.startswith("missing:")]
    missing = [op[len("missing:") :] for op in ops[0] if op.startswith("missing:")]
    assert not missing, f"ops with no entry in tests/fuzz/fuzz_templates.py (add one): {missing}"
    assert len(results) >= min(CASES, 1000), f"only {len(results)} cases ran in {SECONDS} s"
    # A fuzzer whose calls never get past the checks tests nothing: every op must accept some of its cases
    # and refuse others.
    for op in names:
        outcomes = [r["outcome"] for r in results if r["op"] == op]
        accepted = outcomes.count("accepted") / max(len(outcomes), 1)
        assert 0.05 <= accepted <= 0.98, f"{op}: {accepted:.0%} of {len(outcomes)} cases accepted"
