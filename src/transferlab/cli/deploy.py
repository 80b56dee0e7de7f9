"""`transferlab export` and `serve`: a trained model taken out of Python."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, err, given, out, setup_logging
from .flags import REJECT_HELP, flag, names


@app.command()
def export(model: Path = typer.Argument(..., help="A model bundle folder, such as runs/NAME/model."),
           export_format: str = flag("export_format", default="onnx"),
           out_file: Optional[Path] = typer.Option(None, "--out", help="Output file [default: "
                                                   "MODEL/model.onnx, MODEL/model.int8.onnx, "
                                                   "MODEL/model.xml, MODEL/model.int8.xml, "
                                                   "MODEL/model.tflite or MODEL/model.mlpackage]."),
           quantize: Optional[str] = flag("quantize"),
           opset: Optional[int] = flag("opset"),
           device: Optional[str] = flag("device")):
    """Export MODEL's whole network to ONNX (or OpenVINO IR, LiteRT or Core ML), checked against
    torch, and record it in config.json.

    The check uses the run's validation images when MODEL is a run's model/ folder (64 of them; all
    of them with --quantize, to measure the accuracy change), random noise otherwise. OpenVINO's int8
    is calibrated on them too, so it needs a run's model/ folder. Core ML models run only on Apple
    systems: here the command checks the package's interface and says that numerical parity was not
    run."""
    setup_logging(verbose=False)
    from ..deploy.export import check_export_target, run_val_images
    from ..deploy.formats import EXPORT_FORMATS
    from ..evaluation.heldout import PARITY_IMAGES
    from ..options import check

    check({"export_format": export_format, "quantize": quantize, "opset": opset, "device": device},
          {"export_format": EXPORT_FORMATS})
    check_export_target(model, out_file, quantize, export_format)  # before reading any image
    labelled = run_val_images(model, limit=None if quantize else PARITY_IMAGES)
    images, labels = labelled or (None, None)
    result = EXPORT_FORMATS[export_format](model, out_file, quantize=quantize, images=images,
                                           labels=labels, **given(opset=opset, device=device))
    parity = result.parity
    opset = f"opset {result.opset}, " if result.opset else ""
    out.print(f"wrote [bold]{escape(str(result.path))}[/] ({opset}"
              f"{result.quantization or 'fp32'}, sha256 {result.sha256[:12]}…)")
    if not parity.get("run", True):
        out.print(f"numerical parity with torch: not run ({escape(parity['reason'])})")
        if "folded_in_torch" in parity:
            out.print("checked instead: the input, outputs and class labels of the package, and, "
                      "in torch, that the folded normalisation and temperature give the bundle's "
                      "probabilities (largest difference "
                      f"{parity['folded_in_torch']['max_abs_prob_diff']:.2e})")
        return
    source = ("validation images of the run" if parity["source"] == "images" else
              "random-noise images (MODEL is not in a run directory with its data)")
    out.print(f"parity with torch on {parity['images']} {source}: top-1 agreement "
              f"{parity['top1_agreement']:.2%}, largest probability difference "
              f"{parity['max_abs_prob_diff']:.2e} (mean {parity['mean_abs_prob_diff']:.2e})")
    if "accuracy" in parity:
        accuracy = parity["accuracy"]
        out.print(f"accuracy: torch {accuracy['torch']:.2%}, {export_format} "
                  f"{accuracy[export_format]:.2%} (change {100 * accuracy['change']:+.2f} points)")


@app.command()
def serve(model: Path = typer.Argument(..., help="A model bundle folder, such as runs/NAME/model."),
          host: str = flag("host", default="127.0.0.1"),
          port: int = flag("port", default=8000),
          allowed_hosts: Optional[str] = flag("allowed_hosts"),
          workers: int = flag("serve_workers", default=1),
          backend: str = flag("backend", default="torch"),
          device: Optional[str] = flag("device"),
          engine: Optional[str] = flag("engine"),
          max_upload_mb: float = flag("max_upload_mb", default=10.0),
          max_pixels: Optional[int] = flag("max_pixels", help="Most pixels per image, checked "
                                           "before decoding [default: 50,000,000]."),
          max_files: Optional[int] = flag("max_files"),
          max_concurrent: Optional[int] = flag("max_concurrent"),
          top_k: Optional[int] = flag("top_k", help="Classes per image when the request does not "
                                      "say [default: 3]."),
          max_batch: Optional[int] = flag("max_batch"),
          batch_window_ms: Optional[float] = flag("batch_window_ms"),
          reject_unknown: bool = typer.Option(False, "--reject-unknown", help=REJECT_HELP),
          access_log: bool = typer.Option(False, "--access-log", help=(
              "Log a line per request (off by default: it costs a few percent of the images/s "
              "served)."))):
    """Serve MODEL over HTTP: POST /predict (multipart field `file`), GET /health, GET /model, a
    page to try it at / and the API docs at /docs."""
    from ..options import check
    from ..inference.graphs import ENGINES

    check({"max_upload_mb": max_upload_mb, "host": host, "port": port, "serve_workers": workers,
           "max_pixels": max_pixels, "max_files": max_files, "max_concurrent": max_concurrent,
           "top_k": top_k, "max_batch": max_batch, "batch_window_ms": batch_window_ms,
           "device": device, "allowed_hosts": allowed_hosts, "engine": engine},
          {"engine": ENGINES})
    setup_logging()
    import signal

    from ..deploy.serve import serve as run_service

    # Uvicorn shuts down gracefully on SIGINT and SIGTERM, then re-raises the signal: with the
    # default handlers back, the process ends as killed by it, as service managers expect.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    err.print(f"loading {escape(str(model))} ({backend}); once it runs, try it at http://{host}:{port}/ "
              f"(API docs: http://{host}:{port}/docs)", highlight=False)
    run_service(model, host=host, port=port, workers=workers, access_log=access_log, backend=backend,
                **given(engine=engine),
                max_upload_bytes=round(max_upload_mb * 2**20),
                **given(max_pixels=max_pixels, max_files=max_files, max_concurrent=max_concurrent,
                        top_k=top_k, max_batch=max_batch, batch_window_ms=batch_window_ms,
                        device=device, allowed_hosts=names(allowed_hosts)),
                reject_unknown=reject_unknown)
