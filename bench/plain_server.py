"""The peer of the Serve application in bench/serve_load.py: the simplest server a user might
write instead -- one uvicorn process, FastAPI, the same model, decoding and micro-batching.

    python bench/plain_server.py --checkpoint runs/train-X --port 8100 --threads 1 \\
        --max-batch-size 16 --batch-wait-ms 5

POST /v1/predict (PNG/JPEG body) -> {"predictions": [...], "batch_size": n}; GET /healthz.
Images are decoded as a Serve replica does (small ones inline, large ones in a thread pool of
the replica's `decode_threads`), queued, and run through the model in batches of up to --max-batch-size, waiting at most
--batch-wait-ms for a batch to fill -- what `@serve.batch` does in the replica. No auth, limits
or metrics beyond the body limit: it is the yardstick, not a product.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from resnet_dist.constants import IMAGE_SIZE  # noqa: E402
from resnet_dist.inference import (  # noqa: E402
    INLINE_DECODE_PIXELS, InputError, decode_pixels, freeze_predictor, freeze_startup_heap, load_predictor, open_image,
    predict_probs, share_gil_with_model_thread, top_k,
)


class MicroBatcher:
    """Requests' images queued and run through `fn` together: up to `max_size` per call, waiting at
    most `wait_s` after the first one for more."""

    def __init__(self, fn, max_size: int, wait_s: float) -> None:
        self.fn, self.max_size, self.wait_s = fn, max_size, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def submit(self, image: np.ndarray):
        if self.task is None:
            self.task = asyncio.create_task(self._loop())
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((image, done))
        return await done

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_size:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:   # in a thread, as the replica does: the loop keeps reading requests meanwhile
                out = await asyncio.to_thread(self.fn, np.stack([image for image, _ in batch]))
                for (_, done), row in zip(batch, out):
                    done.set_result((row, len(batch)))
            except Exception as e:   # noqa: BLE001 -- handed to the waiting requests
                for _, done in batch:
                    done.set_exception(e)


def build(args: argparse.Namespace) -> FastAPI:
    torch.set_num_threads(args.threads)
    share_gil_with_model_thread()   # as the Serve replica does
    predictor = load_predictor(args.checkpoint, torch.device("cpu"))
    if not args.eager_model:   # as the replica does by default
        predictor = freeze_predictor(predictor)
    pool = ThreadPoolExecutor(args.decode_threads)
    batcher = MicroBatcher(lambda x: predict_probs(predictor, x), args.max_batch_size, args.batch_wait_ms / 1000)
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request):
        body = await request.body()
        if len(body) > args.max_body_bytes:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:   # the replica's policy: small images decoded inline, large ones in the pool
            img = open_image(body)
            image = (decode_pixels(img, IMAGE_SIZE) if img.width * img.height <= INLINE_DECODE_PIXELS
                     else await asyncio.get_running_loop().run_in_executor(pool, decode_pixels, img, IMAGE_SIZE))
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        probs, n = await batcher.submit(image)
        return JSONResponse({"predictions": top_k(probs[None], predictor.classes, 5)[0], "batch_size": n})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    freeze_startup_heap()   # as the replica does
    return app


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--decode-threads", type=int, default=2, help="decode pool size (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--eager-model", action="store_true", help="eager PyTorch, not the frozen TorchScript graph")
    args = p.parse_args(argv)
    # One worker process, the asyncio loop (uvloop and httptools when installed, as under Serve).
    uvicorn.run(build(args), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
