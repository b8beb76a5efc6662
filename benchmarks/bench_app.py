"""Load check of the web app: cold start of `python app.py`, then concurrent gradio_client users on loopback.

    python benchmarks/bench_app.py --model outputs            # 8 users x 50 predictions (the defaults)
    git worktree add /tmp/before <commit>    # or: mkdir /tmp/before && git archive <commit> | tar -x -C /tmp/before
    python benchmarks/bench_app.py --model outputs --compare /tmp/before --rounds 2   # A B A B, same load

Prints a table and writes benchmarks/results/bench_app-<time>.json. Goals (ResNet18 demo model, 2 CPU cores):
0 errors, p95 <= 150 ms, cold start (process start to first answer) <= 8 s. Besides latency it reports the server's
resident memory while serving (peak of /proc/PID/status VmRSS, sampled every 100 ms) and its CPU time per answer
(utime + stime over the load, from /proc/PID/stat): a figure that a busy machine disturbs less than wall time.
`--compare ROOT` runs the same in another checkout's app.py, alternating with this one, so both see the same load.
Figures depend on everything else the machine runs: the JSON records the load average before and after.
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_images(folder: Path, count: int = 16) -> list[str]:
    """`count` demo images with random attributes (seeded), as the app's users would send."""
    from attrclf import demo

    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        attributes = {name: int(rng.random() < 0.5) for name in demo.LABEL_NAMES}
        path = folder / f"load_{i:02d}.png"
        demo.draw_example(rng, attributes, 64).save(path)
        paths.append(str(path))
    return paths


def model_alone(model: str, images: list[str], threads: int = 1) -> dict:
    """Milliseconds per single-image prediction without the server: the model's share of a request's latency."""
    import torch

    from attrclf import Predictor

    torch.set_num_threads(threads)
    predictor = Predictor.from_pretrained(model, device="cpu")
    predictor.predict_probs([images[0]])  # warm-up
    ms = []
    for i in range(50):
        begin = time.perf_counter()
        predictor.predict_probs([images[i % len(images)]])
        ms.append((time.perf_counter() - begin) * 1000)
    return {"threads": threads, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """The peak resident memory of a process, sampled every 100 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.stopped = pid, 0.0, threading.Event()

    def run(self):
        while not self.stopped.wait(0.1):
            try:
                self.peak_mb = max(self.peak_mb, proc_rss_mb(self.pid))
            except OSError:
                return


def cold_start(model: str, port: int, image: str, extra: list[str], root: Path = REPO) -> tuple[subprocess.Popen, dict]:
    """Start `python app.py` of checkout `root`; seconds until the page answers and until the first prediction."""
    import httpx
    from gradio_client import Client, handle_file

    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(root / "app.py"), "--model", model, "--port", str(port), *extra],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(root)})
    url = f"http://127.0.0.1:{port}/"
    while True:
        if server.poll() is not None:
            raise SystemExit(f"app.py exited with code {server.returncode}; run it by hand to see why")
        try:
            if httpx.get(f"{url}config", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    page = time.perf_counter() - start
    Client(url, verbose=False).predict(handle_file(image), api_name="/predict")
    return server, {"page_s": page, "first_answer_s": time.perf_counter() - start}


def client_call(url: str):
    """One user's prediction function through gradio_client (what the README shows API users)."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    return lambda image: client.predict(handle_file(image), api_name="/predict")


def http_call(url: str):
    """One user's prediction function in plain HTTP (upload, /call/predict, read the event stream): the server's
    share of the latency, without gradio_client's own overhead (threads, polling every 50 ms)."""
    import httpx

    http = httpx.Client(base_url=f"{url}gradio_api", timeout=60)

    def call(image: str) -> dict:
        with open(image, "rb") as f:
            path = http.post("/upload", files={"files": f}).json()[0]
        upload = {"path": path, "meta": {"_type": "gradio.FileData"}}
        event = http.post("/call/predict", json={"data": [upload, False, 0.5]}).json()["event_id"]
        stream = http.get(f"/call/predict/{event}").text
        if "event: complete" not in stream:
            raise RuntimeError(stream[-300:])
        return json.loads(stream.split("event: complete\ndata: ", 1)[1].splitlines()[0])[-1]  # [state, result]

    return call


def user(call, images: list[str], requests: int, offset: int, barrier: threading.Barrier, out: dict) -> None:
    """One user: `requests` predictions one after another; latency in seconds, every failure counted."""
    barrier.wait()
    for i in range(requests):
        begin = time.perf_counter()
        try:
            result = call(images[(offset + i) % len(images)])
            if not result.get("probabilities"):
                raise ValueError(f"empty result {result}")
            out["latencies"].append(time.perf_counter() - begin)
        except Exception as e:  # noqa: BLE001 (a load check counts every failure, whatever its type)
            out["errors"].append(f"{type(e).__name__}: {e}")


def load(url: str, images: list[str], users: int, requests: int, http: bool = False) -> dict:
    out = {"latencies": [], "errors": []}
    barrier = threading.Barrier(users + 1)
    calls = [(http_call if http else client_call)(url) for _ in range(users)]
    threads = [threading.Thread(target=user, args=(call, images, requests, k * 7, barrier, out))
               for k, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = np.asarray(out["latencies"]) * 1000
    report = {"client": "http" if http else "gradio_client", "users": users, "requests_per_user": requests,
              "ok": int(ms.size), "errors": len(out["errors"]), "first_errors": out["errors"][:5], "wall_s": wall}
    if ms.size:
        report.update({f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}, mean_ms=float(ms.mean()),
                      max_ms=float(ms.max()), throughput_per_s=ms.size / wall)
    return report


def serve_once(model: str, root: Path, images: list[str], args, app_flags: list[str]) -> dict:
    """One app (checkout `root`): cold start, then the load, with the server's CPU per answer and peak RSS."""
    port = free_port()
    server, cold = cold_start(model, port, images[0], app_flags, root)
    sampler = RssSampler(server.pid)
    sampler.start()
    try:
        cpu_before, client_before = proc_cpu_s(server.pid), proc_cpu_s(os.getpid())
        run = load(f"http://127.0.0.1:{port}/", images, args.users, args.requests, args.http)
        run["server_cpu_ms_per_answer"] = (proc_cpu_s(server.pid) - cpu_before) * 1000 / max(run["ok"], 1)
        run["client_cpu_ms_per_answer"] = (proc_cpu_s(os.getpid()) - client_before) * 1000 / max(run["ok"], 1)
        run["server_rss_mb"] = max(sampler.peak_mb, proc_rss_mb(server.pid))
    finally:
        sampler.stopped.set()
        server.terminate()
        server.wait(timeout=30)
    return {"root": str(root), "cold_start": cold, "load": run}


def table(report: dict) -> str:
    cold, run = report["cold_start"], report["load"]
    rows = [
        ("app", report.get("root", str(REPO)), ""),
        ("cold start: page answers", f"{cold['page_s']:.2f} s", ""),
        ("cold start: first prediction", f"{cold['first_answer_s']:.2f} s", "goal <= 8 s"),
        (f"{run['users']} {run['client']} users: ok / errors", f"{run['ok']} / {run['errors']}", "goal 0 errors"),
    ]
    if run["errors"]:
        rows.append(("first error", run["first_errors"][0][:60], ""))
    if run["ok"]:
        rows += [
            ("latency p50", f"{run['p50_ms']:.0f} ms", ""),
            ("latency p95", f"{run['p95_ms']:.0f} ms", "goal <= 150 ms"),
            ("latency p99 / max", f"{run['p99_ms']:.0f} / {run['max_ms']:.0f} ms", ""),
            ("throughput", f"{run['throughput_per_s']:.1f} predictions/s", ""),
            ("server CPU per answer", f"{run['server_cpu_ms_per_answer']:.1f} ms", "user + system"),
            ("clients' CPU per answer", f"{run['client_cpu_ms_per_answer']:.1f} ms", "this process, same cores"),
            ("server RSS while serving (peak)", f"{run['server_rss_mb']:.0f} MB", ""),
        ]
    alone = report["model_alone"]
    rows.append(("model alone (no server) p50 / p95", f"{alone['p50_ms']:.0f} / {alone['p95_ms']:.0f} ms", "1 thread"))
    rows.append(("load average before / after", f"{report['loadavg_before'][0]:.2f} / {report['loadavg_after'][0]:.2f}",
                 f"{report['cpus']} CPUs"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>22}  {goal}" for name, value, goal in rows)


def write_json(report: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench_app-{datetime.now():%Y%m%d-%H%M%S}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs", help="model folder or Hub id served by app.py")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="predictions per user")
    parser.add_argument("--http", action="store_true",
                        help="users speak plain HTTP instead of gradio_client (the server's share of the latency)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--compare", type=Path, default=None,
                        help="another checkout (e.g. the commit before) whose app.py runs the same, alternating")
    parser.add_argument("--rounds", type=int, default=1, help="times each app is measured (alternating with --compare)")
    args, app_flags = parser.parse_known_args(argv)  # anything else goes to app.py (--concurrency, --threads)
    import gradio
    import torch

    report = {"model": args.model, "app_flags": app_flags, "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
              "python": platform.python_version(), "gradio": gradio.__version__, "torch": torch.__version__,
              "machine": platform.machine()}
    roots = [REPO] + ([args.compare.resolve()] if args.compare else [])
    with tempfile.TemporaryDirectory() as folder:
        images = demo_images(Path(folder))
        report["model_alone"] = model_alone(args.model, images)
        report["runs"] = [serve_once(args.model, root, images, args, app_flags)
                          for _ in range(args.rounds) for root in roots]
    report["loadavg_after"] = os.getloadavg()
    for run in report["runs"]:
        print(table({**report, **run}), end="\n\n")
    print(f"wrote {write_json(report, args.results)}")


if __name__ == "__main__":
    main()
