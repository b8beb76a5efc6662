"""How the app serves, without gradio or torch at import: settings, the model loaded in the background, the batcher.

`python app.py` and `attrclf app` parse `AppSettings`, then `ModelLoader` starts importing torch and timm and loading
the model in a thread while the main thread imports gradio and builds the page (attrclf.ui): the two largest imports
of the cold start overlap. `MicroBatcher` turns the page's one-image requests into batched forward passes.

Why not gradio's own `batch=True`: in gradio 6.31 a batched event runs its whole batch as one call, so one user's bad
upload can only fail every request of the batch (a batch function cannot raise for one item, and a `validator`
on a batched event answers HTTP 400), and the queue batches only what is already waiting, with no wait to gather
more. Here each request is its own queued event that decodes its upload and fails alone with a clear message; only
the model call is shared, after a wait of at most `batch_wait_ms` for up to `max_batch_size` requests.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from .errors import AttrclfError

HOW_TO_GET_A_MODEL = (
    "Train the demo model with `accelerate launch train.py` (it writes `outputs/`, which the app serves by default), "
    "or set `ATTRCLF_MODEL` to a model folder or a Hub id (`user/name`), or pass `--model`."
)


@dataclass
class AppSettings:
    """How the app is served. Flags win over environment variables, which win over defaults.

    Attributes:
        model: Model folder or Hub id; None when there is none (the page then says how to get one).
        host: Server address (None: gradio's GRADIO_SERVER_NAME, else 127.0.0.1; "0.0.0.0" to listen on the network).
        port: Server port (None: gradio's GRADIO_SERVER_PORT, else the first free port from 7860).
        concurrency: Requests handled at once (each decodes its own upload; their model calls are batched); more
            requests wait in the queue.
        threads: torch threads of the model's forward pass (one forward runs at a time: the batcher's). 1 by
            default: on 2 cores that also decode uploads and run the server, a second OpenMP thread spin-waits and
            cost 4x the CPU per answer in bench_app.py.
        queue_size: Requests that may wait; beyond it users are told the queue is full.
        max_file_size: Largest upload gradio accepts ("10mb").
        examples: Folder of example images (None: generated demo examples when the model is the demo's).
        max_batch_size: Most single-image requests answered by one forward pass.
        batch_wait_ms: How long the first request of a batch waits for others to join it.
        backend: Inference backend (attrclf.backends: auto, torch, torch-bf16, onnx, onnx-int8); "auto" picks the
            fastest one measured on this machine that keeps the model's accuracy.
    """

    model: str | None = None
    host: str | None = None
    port: int | None = None
    concurrency: int = 8
    threads: int = 1
    queue_size: int = 64
    max_file_size: str = "10mb"
    examples: str | None = None
    max_batch_size: int = 8
    batch_wait_ms: float = 2.0
    backend: str = "auto"

    @classmethod
    def parse(cls, argv: list[str] | None = None, environ=None) -> AppSettings:
        """Settings from flags (`argv`) and environment variables (ATTRCLF_MODEL, ATTRCLF_EXAMPLES)."""
        environ = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(prog="python app.py", description="Serve an attrclf model in a web page.")
        parser.add_argument("--model", default=environ.get("ATTRCLF_MODEL") or default_model(),
                            help="model folder or Hub id (default: $ATTRCLF_MODEL, else outputs/ if it exists)")
        parser.add_argument("--host", default=None,
                            help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
        parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
        parser.add_argument("--concurrency", type=int, default=cls.concurrency, help="requests handled at once")
        parser.add_argument("--threads", type=int, default=cls.threads, help="torch threads of the forward pass")
        parser.add_argument("--queue-size", type=int, default=cls.queue_size, help="requests that may wait")
        parser.add_argument("--max-file-size", default=cls.max_file_size, help="largest upload, e.g. 10mb")
        parser.add_argument("--examples", default=environ.get("ATTRCLF_EXAMPLES"),
                            help="folder of example images (default: $ATTRCLF_EXAMPLES, else demo examples)")
        parser.add_argument("--max-batch-size", type=int, default=cls.max_batch_size,
                            help="most single-image requests answered by one forward pass")
        parser.add_argument("--batch-wait-ms", type=float, default=cls.batch_wait_ms,
                            help="how long a request waits for others to share its forward pass")
        parser.add_argument("--backend", default=environ.get("ATTRCLF_BACKEND") or cls.backend,
                            help="inference backend: auto, torch, torch-bf16, onnx or onnx-int8 (default: "
                                 "$ATTRCLF_BACKEND, else auto: the fastest measured here within the accuracy "
                                 "tolerance)")
        args = parser.parse_args([] if argv is None else argv)
        if min(args.concurrency, args.threads, args.queue_size, args.max_batch_size) < 1:
            parser.error("--concurrency, --threads, --queue-size and --max-batch-size must be at least 1")
        if args.batch_wait_ms < 0:
            parser.error("--batch-wait-ms must be 0 or more")
        if args.examples and not os.path.isdir(args.examples):
            parser.error(f"--examples / ATTRCLF_EXAMPLES: '{args.examples}' is not a folder of images")
        return cls(**vars(args))


def default_model() -> str | None:
    """The quickstart's output folder when it exists."""
    return "outputs" if os.path.isfile(os.path.join("outputs", "config.json")) else None


def load_predictor(model: str | None, threads: int | None = None, backend: str = "auto"):
    """(predictor, a line for the console). No model, or one that does not load: (None, what to do).

    Args:
        model: Model folder or Hub id.
        threads: Set torch's (process-wide) thread count for serving; None leaves it alone.
        backend: Inference backend for Predictor.from_pretrained.
    """
    import torch

    from .predict import Predictor

    if threads:
        torch.set_num_threads(threads)
    if not model:
        return None, f"No model to serve. {HOW_TO_GET_A_MODEL}"
    try:
        predictor = Predictor.from_pretrained(model, backend=backend)
    except AttrclfError as e:
        return None, f"Could not load model '{model}': {e}\n{HOW_TO_GET_A_MODEL}"
    names = predictor.label_names
    return predictor, (f"Serving '{model}': {predictor.config.backbone}, {len(names)} attributes "
                       f"({', '.join(names)}), backend {predictor.backend_name}")


def warm_up(predictor) -> None:
    """One forward pass on a blank image, so that the first user does not pay for the kernels' first call."""
    from PIL import Image

    _, height, width = predictor.config.input_size
    predictor.predict_probs([Image.new("RGB", (width, height), (128, 128, 128))])


class ModelLoader:
    """`load_predictor` in a background thread, started at once; `result()` waits for it.

    The thread imports torch and timm and reads the weights while the caller imports gradio and builds the page; then
    it runs `warm_up` (the page does not wait for that).
    """

    def __init__(self, model: str | None, threads: int | None = None, backend: str = "auto"):
        self.model, self.backend = model, backend
        self._loaded = threading.Event()
        self._outcome: tuple = (None, "the model is still loading")
        self._thread = threading.Thread(target=self._load, args=(threads,), name="attrclf-model-loader", daemon=True)
        self._thread.start()

    def _load(self, threads: int | None) -> None:
        try:
            self._outcome = load_predictor(self.model, threads, self.backend)
        except Exception as e:  # noqa: BLE001 (the page says what failed instead of the thread dying silently)
            self._outcome = (None, f"Could not load model '{self.model}': {type(e).__name__}: {e}\n"
                                   f"{HOW_TO_GET_A_MODEL}")
        finally:
            self._loaded.set()
        if self._outcome[0] is not None:
            warm_up(self._outcome[0])

    def result(self) -> tuple:
        """(predictor or None, the console line), as load_predictor gives them."""
        self._loaded.wait()
        return self._outcome


class MicroBatcher:
    """Answers single items from batched calls: `batcher(item)` blocks until `run_batch([...items])` has run.

    A worker thread takes the first waiting item, waits up to `wait_s` for more (at most `max_batch_size` in all),
    calls `run_batch(items)` once, and hands each caller its own row of the result (in submission order). An exception
    of `run_batch` reaches every caller of that batch.

    Args:
        run_batch: Items -> a sequence of results, one per item, in order.
        max_batch_size: Most items per call.
        wait_s: Longest wait for a batch to fill once its first item is there.
    """

    def __init__(self, run_batch, max_batch_size: int = 8, wait_s: float = 0.002):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.batch_sizes: list[int] = []  # every call's size, for tests and the benchmark
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="attrclf-batcher", daemon=True).start()

    def __call__(self, item):
        future: Future = Future()
        self._queue.put((item, future))
        return future.result()

    def _gather(self) -> list:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _work(self) -> None:
        while True:
            batch = self._gather()
            self.batch_sizes.append(len(batch))
            try:
                results = self.run_batch([item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 (handed to the callers, who report it)
                for _, future in batch:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)


def main(argv: list[str] | None = None) -> int:
    """`attrclf app [flags]`: serve the app until interrupted (argv None: the process's own flags)."""
    settings = AppSettings.parse(sys.argv[1:] if argv is None else argv)
    loader = ModelLoader(settings.model, settings.threads, settings.backend)  # torch loads while gradio imports
    from .ui import build_app, launch

    launch(build_app(settings, loader), settings)
    return 0
