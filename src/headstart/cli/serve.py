"""``headstart export`` and ``headstart serve``: a trained model as a portable file, or as a web service."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` and ``serve`` subcommands."""
    p = sub.add_parser("export", help="write a trained model as ONNX or TorchScript, preprocessing and classes inside")
    p.add_argument("run", help="run folder of a trained model")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--out", help="output file (default RUN/<what>.onnx or RUN/<what>.torchscript.pt)")
    p.add_argument("--what", default="classifier", choices=["classifier", "embedder"],
                   help="classifier: class logits; embedder: the backbone's features")  # fmt: skip
    p.add_argument("--input", default="float", choices=["float", "uint8"],
                   help="float: normalised float32 NCHW; uint8: cropped pixels, normalised in-graph")  # fmt: skip
    p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"],
                   help="ONNX exporter: dynamo (torch.export), legacy (TorchScript), auto: dynamo first")  # fmt: skip
    p.add_argument("--quantize", choices=["int8"],
                   help="also write <name>.int8.onnx: onnxruntime static int8 calibrated on training data")  # fmt: skip
    p.add_argument("--calibration", help="images to calibrate and check int8 on (default: the run's train/val split)")
    p.add_argument("--calibration-images", type=int, default=128, help="most images to calibrate int8 on")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="least top-1 agreement of int8 with fp32 on the check images, else no int8 file")  # fmt: skip

    p = sub.add_parser("serve", help="serve a trained model over HTTP: REST API and a web page")
    p.add_argument("run", help="run folder of a trained model")
    p.add_argument("--index", help="retrieval index folder (`headstart index build`) for /search and thumbnails")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; others need an API key or --insecure)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body; larger ones get 413")
    p.add_argument("--max-queue", type=int, metavar="N", help="requests in progress at a time; one more gets 503 "
                   "with Retry-After at once (default 32, the most images in one request)")  # fmt: skip
    key = p.add_argument_group("access", "requests without the key get 401; the web page asks for it once. Without "
                               "--api-key-file or --api-key, the key is read from $HEADSTART_API_KEY")  # fmt: skip
    key.add_argument("--api-key-file", metavar="FILE", help="file holding the API key (make one: python -c "
                     "'import secrets; print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE)")  # fmt: skip
    key.add_argument("--api-key", metavar="KEY", help="the API key itself; other users of the machine can read it "
                     "in `ps`, so prefer the file or the variable")  # fmt: skip
    key.add_argument("--insecure", action="store_true",
                     help="serve a non-loopback --host without a key (refused otherwise)")  # fmt: skip


def _export(args: argparse.Namespace) -> int:
    from headstart.serving.export import export, read_metadata

    path = export(
        args.run, args.format, args.out, args.what, input=args.input, exporter=args.exporter, quantize=args.quantize,
        calibration=args.calibration, calibration_images=args.calibration_images, min_agreement=args.min_agreement,
    )  # fmt: skip
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.quantize:
        check = read_metadata(path)["quantization"]
        print(f"int8 top-1 agreement with fp32: {check['agreement']:.3f} on {check['images']} images "
              f"({check['check_source']})")  # fmt: skip
    return 0


def _serve(args: argparse.Namespace) -> int:
    from headstart.serving.serve import run

    queue = {} if args.max_queue is None else {"max_queue": args.max_queue}
    run(args.run, args.index, args.host, args.port, max_upload_bytes=int(args.max_upload_mb * 2**20),
        api_key=args.api_key, api_key_file=args.api_key_file, insecure=args.insecure, **queue)  # fmt: skip
    return 0


HANDLERS = {
    "export": _export,
    "serve": _serve,
}
