"""`gradserve-client`: compute, info, health, example."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Any

import numpy as np

from gradserve.client._client import GradientClient
from gradserve.client._errors import GradserveError
from gradserve.client._examples import ensemble_network, notebook_network
from gradserve.client._job import (
    ACTIVATIONS,
    LOSSES,
    JobOptions,
    build_job,
    is_optimizer_state,
    is_parameter,
)
from gradserve.client._jobfile import SUMMARY_KEY, load_job, save_job, save_results, strict_json
from gradserve.client._models import normalize
from gradserve.client._progress import ProgressBar
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1.shapes import SAMPLE_TENSORS

DEFAULT_ADDRESS = os.environ.get("GRADSERVE_ADDRESS", "127.0.0.1:50051")
OPTION_NAMES = {f.name for f in fields(JobOptions)}
PROGRESS_MIN_BYTES = 16 << 20  # smaller transfers take well under a second on a LAN
# JSON types a job file's options may take: those of JobOptions' defaults, and for the
# options whose default is None, these.
NUMBER = (int, float)
OPTION_TYPES = {
    **{f.name: type(f.default) for f in fields(JobOptions) if f.default is not None},
    "clip_norm": NUMBER, "learning_rate": NUMBER, "weight_decay": NUMBER, "eps": NUMBER,
    "noise_seed": int, "gradient_dtype": str, "optimizer": str,
    "hidden_activation": (str, list), "output_activation": (str, list), "betas": list,
}  # fmt: skip


# Keys of a job file's JSON description: the architecture's layer_sizes (the tensors say
# them too) and the compute() options that are plain values.
JOB_FILE_OPTIONS = OPTION_NAMES - {"optimizer_state", "on_step", "on_progress"}


def _checked_job_options(path: str, job: dict) -> dict:
    """The job file's options, each of its JSON type (a float option may be written 1). A
    key that is none (a misspelt "reducton") is refused rather than silently dropped."""
    options = {}
    for name, value in job.items():
        if name == "layer_sizes":
            continue  # checked against the tensors: _check_layer_sizes
        if name not in JOB_FILE_OPTIONS:
            raise ValueError(
                f"{path}: unknown job key {name!r}; known: "
                f"{', '.join(sorted(JOB_FILE_OPTIONS | {'layer_sizes'}))}"
            )
        want = OPTION_TYPES[name]
        want = NUMBER if want is float else want
        if isinstance(value, bool) and want is not bool or not isinstance(value, want):
            raise ValueError(f"{path}: option {name!r} has the wrong type: {value!r}")
        options[name] = value
    return options


def _check_layer_sizes(path: str, sizes, params: dict) -> None:
    """A job file's layer_sizes, where given, must be the ones its weights have."""
    if sizes is None:
        return
    count = sum(1 for name in params if name.endswith(".weight"))
    weights = [params.get(f"layers.{i}.weight") for i in range(count)]
    if not weights or any(w is None or w.ndim != 3 for w in weights):
        return  # the client names what is wrong with the parameters themselves
    actual = [int(weights[0].shape[2])] + [int(w.shape[1]) for w in weights]
    if sizes != actual:
        raise ValueError(f"{path}: layer_sizes {sizes} disagree with the weights' {actual}")


def _parameters_from(path: str, job_path: str, tensors: dict, training: bool) -> tuple[dict, Any]:
    """The job's tensors with its parameters (and, when `training`, optimiser state)
    replaced by those of an earlier training job's results file, and the steps that state
    has taken (its summary's trained_steps; None where the summary does not say): the job's
    start_step. Without state (trained without --return-optimizer-state, or a job that
    does not train) that is 0, as with a fresh torch.optim optimiser."""
    results, summary = load_job(path, SUMMARY_KEY)
    params = {k: v for k, v in results.items() if is_parameter(k)}
    if not params:
        raise ValueError(
            f"{path}: holds no parameters (layers.{{i}}.weight); give the results file of a "
            "training job (--optimizer)"
        )
    own = {k: v for k, v in tensors.items() if is_parameter(k)}
    differ = [
        f"{k} {_shape(params.get(k))} vs {_shape(own.get(k))}"
        for k in sorted(set(params) | set(own))
        if k not in params or k not in own or params[k].shape != own[k].shape
    ]
    if differ:
        raise ValueError(f"{path}: its parameters do not fit {job_path}'s: {', '.join(differ)}")
    state = {k: v for k, v in results.items() if training and is_optimizer_state(k)}
    steps = summary.get("trained_steps") if state else 0
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        steps = None
    kept = {k: v for k, v in tensors.items() if not is_parameter(k) and not is_optimizer_state(k)}
    return {**kept, **params, **state}, steps


def _shape(a) -> str:
    return "missing" if a is None else str(list(a.shape))


# The client's TLS options by the flags that set them: a CLI user knows the flags.
TLS_FLAGS = {"root_certificates": "--ca", "client_certificate": "--cert", "client_key": "--key"}


def in_flag_terms(message: str) -> str:
    """An error message of the client's, its TLS options named by their flags."""
    for option, flag in TLS_FLAGS.items():
        message = message.replace(option, flag)
    return message


def tls_options(args) -> dict:
    """The client's TLS options from the flags."""
    if bool(args.cert) != bool(args.key):
        raise ValueError("--cert and --key go together")
    return dict(tls=args.tls, root_certificates=args.ca, client_certificate=args.cert,
                client_key=args.key)  # fmt: skip


def connect(args) -> GradientClient:
    return GradientClient(
        args.address.split(","), timeout=args.timeout, token=args.token or None,
        **tls_options(args),
    )  # fmt: skip


def _compute(args) -> int:
    tensors, job = load_job(args.job)
    overrides = {k: v for k, v in vars(args).items() if k in OPTION_NAMES and v is not None}
    options = _checked_job_options(args.job, job)
    if args.parameters_from:  # before the flags, so that --start-step still wins
        training = bool(overrides.get("optimizer", options.get("optimizer")))
        tensors, steps = _parameters_from(args.parameters_from, args.job, tensors, training)
        if steps is None and args.start_step is None:
            raise ValueError(
                f"{args.parameters_from}: its summary ({SUMMARY_KEY}) does not say how many "
                "steps its optimiser state has taken (trained_steps); give --start-step"
            )
        options["start_step"] = steps
    options.update(overrides)
    for key in ("hidden_activation", "output_activation"):
        if isinstance(options.get(key), list):  # ["leaky_relu", 0.2] from JSON
            options[key] = tuple(options[key])
    # A job file may carry optimiser state ("layers.0.weight.exp_avg") to continue from.
    params = {k: v for k, v in tensors.items() if is_parameter(k)}
    state = {k: v for k, v in tensors.items() if is_optimizer_state(k)}
    unknown = sorted(set(tensors) - set(params) - set(state) - set(SAMPLE_TENSORS))
    if unknown:  # a misspelt "sample_weight" would otherwise be left out of the job
        raise ValueError(
            f"{args.job}: unknown tensor(s) {', '.join(map(repr, unknown))}; a job file holds "
            "layers.{i}.weight / .bias, optimiser state, inputs, targets and sample_weights"
        )
    _check_layer_sizes(args.job, job.get("layer_sizes"), params)
    if state:
        options["optimizer_state"] = state
    if options.get("optimizer") and not args.json:
        models = next(iter(params.values())).shape[0]
        first = options.get("start_step", 0)  # steps counted over the whole training
        options["on_step"] = lambda k, losses: print(
            f"step {first + k}: mean loss {float(np.mean(losses)):.6g} over {models} models",
            flush=True,
        )
    if "inputs" not in tensors or "targets" not in tensors:
        raise SystemExit(f"{args.job}: the job needs 'inputs' and 'targets' tensors")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if out_dir and not os.path.isdir(out_dir):  # say so before the job runs, not after
        raise SystemExit(f"{args.out}: no such directory {out_dir!r}")
    if args.out and os.path.isdir(args.out):
        raise SystemExit(
            f"{args.out}: is a directory; name a results file in it (.safetensors or .npz)"
        )
    if args.out and os.path.exists(args.out) and os.path.samefile(args.out, args.job):
        raise SystemExit(f"{args.out}: the results would overwrite the job file")
    if args.progress or (args.progress is None and not args.json and sys.stderr.isatty()):
        options["on_progress"] = ProgressBar(
            sys.stderr, min_bytes=0 if args.progress else PROGRESS_MIN_BYTES
        )
    try:  # the client's own checks of the file's values; only these name the job file
        wire_job = build_job(
            normalize(params), tensors["inputs"], tensors["targets"],
            tensors.get("sample_weights"), JobOptions(**options),
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ValueError(f"{args.job}: {e}") from None
    with connect(args) as client:
        result = client._run(wire_job, None)  # what compute() does once it has built the job
    summary = {
        "job_id": result.job_id,
        "engine": result.engine,
        "device": result.device,
        "loss": np.asarray(result.loss).tolist(),
        **result.summary,
    }
    if result.losses is not None:  # what --parameters-from continues from
        summary["trained_steps"] = options.get("start_step", 0) + len(result.losses)
    if args.out:
        out = {k: np.asarray(v, order="C") for k, v in result.tensors.items()}
        bfloat16 = [name for name, d in result.wire_dtypes.items() if d == "bfloat16"]
        save_results(args.out, out, summary, bfloat16)
        summary["out"] = args.out
    if args.json:
        print(strict_json(summary))
    else:
        losses = summary["loss"]
        shown = ", ".join(f"{v:.6g}" for v in losses[:8]) + (" ..." if len(losses) > 8 else "")
        print(f"job {result.job_id} on {result.engine}/{result.device}: loss [{shown}]")
        for name, value in result.tensors.items():
            if name not in ("loss", "losses"):  # shown above, or step by step
                print(f"  {name:<24} {list(value.shape)}  norm {np.linalg.norm(value):.6g}")
        t = result.summary
        print(
            f"  upload {t['upload_seconds']:.4f}s  compute {t['compute_seconds']:.4f}s  "
            f"download {t['download_seconds']:.4f}s"
        )
        if args.out:
            print(f"results written to {args.out}")
    return 0


def _fields(message) -> dict:
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def _enum_names(enum, prefix: str, values) -> list[str]:
    return [enum.Name(v).removeprefix(prefix).lower() for v in values]


def _info(args) -> int:
    with connect(args) as client:
        info = client.server_info()
    data = {
        "version": info.version,
        "engines": [
            {
                "name": e.name,
                "device": e.device,
                "precisions": _enum_names(pb.Precision, "PRECISION_", e.precisions),
                "float32_matmul": e.float32_matmul,
                "library": e.library,
            }
            for e in info.engines
        ],
        "activations": _enum_names(pb.ActivationKind, "ACTIVATION_KIND_", info.activations),
        "losses": _enum_names(pb.LossKind, "LOSS_KIND_", info.losses),
        "dtypes": _enum_names(pb.DataType, "DATA_TYPE_", info.dtypes),
        "limits": _fields(info.limits),
        "batching": _fields(info.batching),
        "stats": _fields(info.stats),
    }
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"gradserve {data['version']}")
    for e in data["engines"]:
        how = [e["library"]] if e["library"] else []
        how += [f"float32 matmul: {e['float32_matmul']}"] if e["float32_matmul"] else []
        how_text = f" ({'; '.join(how)})" if how else ""
        print(f"engine {e['name']} on {e['device']}: {', '.join(e['precisions'])}{how_text}")
    for key in ("activations", "losses", "dtypes"):
        print(f"{key}: {', '.join(data[key])}")
    width = max(len(name) for key in ("limits", "batching", "stats") for name in data[key])
    for key in ("limits", "batching", "stats"):
        print(f"{key}:")
        for name, value in data[key].items():
            print(f"  {name:<{width}}  {_readable(name, value)}")
    return 0


def _readable(name: str, value) -> str:
    """A limit or counter as people read it: byte counts also in MiB/GiB, seconds in ms."""
    if name == "stream_window_bytes" and value == 0:
        return "0 (gRPC's adaptive window)"
    if name == "min_upload_bytes_per_second":
        return f"{value} ({value / 1024:g} KiB/s)" if value else "0 (no minimum)"
    if name.endswith("bytes") and value >= 1 << 20:
        unit, size = ("GiB", 1 << 30) if value >= 1 << 30 else ("MiB", 1 << 20)
        return f"{value} ({value / size:g} {unit})"
    if name.endswith("seconds"):
        return f"{value:g} s" if value >= 1 else f"{value * 1000:g} ms"
    return str(value)


def _health(args) -> int:
    """Exit 0 only when the server's grpc.health.v1 service says SERVING."""
    try:
        with connect(args) as client:
            status = client.health(args.service)
    except GradserveError as e:
        print(f"NOT_SERVING ({e.code.name}: {e.details})")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _bench(args) -> int:
    import asyncio

    from gradserve.client._loadgen import run_load

    report = asyncio.run(
        run_load(
            args.address.split(","),
            concurrency=args.concurrency,
            jobs_per_client=args.jobs_per_client,
            layer_sizes=args.layer_sizes,
            models=args.models,
            samples=args.samples,
            timeout=args.timeout or 60.0,
            token=args.token or None,
            **tls_options(args),
        )
    )
    data = report.as_dict()
    if args.json:
        print(json.dumps(data))
    else:
        print(
            f"{data['jobs']} jobs from {args.concurrency} clients in {data['seconds']} s: "
            f"{data['jobs_per_second']} jobs/s, latency p50 {data['p50_ms']} ms, "
            f"p95 {data['p95_ms']} ms, p99 {data['p99_ms']} ms, "
            f"{data['mean_jobs_per_launch']} jobs per launch, errors {data['errors']}"
        )
        if report.first_error:
            print(f"first error: {report.first_error}", file=sys.stderr)
    return 0 if not report.errors else 1


def _example(args) -> int:
    os.makedirs(args.directory, exist_ok=True)
    written = []
    for name, (tensors, job) in {
        "notebook-2-2-1": notebook_network(),
        "ensemble-64x16-32-32-1": ensemble_network(),
    }.items():
        path = os.path.join(args.directory, f"{name}.{args.format}")
        save_job(path, tensors, job)
        written.append(path)
    print("\n".join(written))
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is no whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def layer_sizes(text: str) -> list[int]:
    """ "16,32,32,1": the widths d0, ..., dL of a network of at least one layer."""
    sizes = [positive_int(part) for part in text.split(",")]
    if len(sizes) < 2:
        raise argparse.ArgumentTypeError(f"needs d0 and at least one layer width, got {text!r}")
    return sizes


def connection_arguments(with_defaults: bool) -> argparse.ArgumentParser:
    """How to reach the server. Given before the command (with defaults) or after it (only
    what is given there counts, so `compute job.st --address HOST:PORT` works too)."""
    p = argparse.ArgumentParser(add_help=False)

    def default(value):
        return value if with_defaults else argparse.SUPPRESS

    p.add_argument(
        "--address",
        default=default(DEFAULT_ADDRESS),
        help=f"server host:port (env GRADSERVE_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    p.add_argument("--timeout", type=float, default=default(None), help="deadline in seconds")
    p.add_argument(
        "--token",
        default=default(os.environ.get("GRADSERVE_TOKEN", "")),
        help="bearer token (env GRADSERVE_TOKEN)",
    )
    p.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS")
    p.add_argument(
        "--ca", default=default(None), help="CA certificate to trust (PEM; implies --tls)"
    )
    p.add_argument("--cert", default=default(None), help="client certificate (PEM; implies --tls)")
    p.add_argument("--key", default=default(None), help="client private key (PEM)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradserve-client",
        description="Run jobs on a gradserve server.",
        parents=[connection_arguments(with_defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    connection = [connection_arguments(with_defaults=False)]

    c = sub.add_parser(
        "compute", parents=connection, help="run a job file, write the results as safetensors"
    )
    c.add_argument("job", help="job file (.safetensors or .npz)")
    c.add_argument("out", nargs="?", help="results file (.safetensors, or .npz)")
    c.add_argument("--json", action="store_true", help="print a JSON summary")
    c.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="upload and download progress on stderr (default: on a terminal, for "
        f"transfers of {PROGRESS_MIN_BYTES >> 20} MiB or more)",
    )
    c.add_argument("--loss", help=f"one of {', '.join(LOSSES)} (default: the job file's, or mse)")
    c.add_argument("--reduction", choices=["mean", "sum"])
    c.add_argument("--huber-delta", dest="huber_delta", type=float, help="delta of loss huber")
    activations = ", ".join(ACTIVATIONS)
    c.add_argument(
        "--hidden-activation",
        dest="hidden_activation",
        help=f"one of {activations} (default: the job file's, or relu)",
    )
    c.add_argument(
        "--output-activation",
        dest="output_activation",
        help=f"one of {activations} (default: the job file's, or identity)",
    )
    c.add_argument(
        "--negative-slope", dest="negative_slope", type=float, help="slope of leaky_relu"
    )
    c.add_argument("--precision", choices=["float32", "tf32", "bfloat16", "float16", "float64"])
    c.add_argument("--backend", choices=["auto", "torch", "triton"])
    c.add_argument(
        "--gradient-dtype",
        dest="gradient_dtype",
        choices=["float32", "float64", "bfloat16", "float16"],
    )
    # Each output and switch also in its --no- form, to turn off what a job file turns on.
    on_off = argparse.BooleanOptionalAction
    c.add_argument(
        "--parameter-gradients",
        dest="parameter_gradients",
        action=on_off,
        default=None,
        help="parameter gradients (on by default)",
    )
    c.add_argument("--input-gradients", dest="input_gradients", action=on_off, default=None)
    c.add_argument("--per-sample-losses", dest="per_sample_losses", action=on_off, default=None)
    c.add_argument(
        "--per-sample-gradient-norms", dest="per_sample_gradient_norms", action=on_off, default=None
    )
    c.add_argument("--forward-outputs", dest="forward_outputs", action=on_off, default=None)
    c.add_argument(
        "--allow-non-finite",
        dest="allow_non_finite",
        action=on_off,
        default=None,
        help="accept NaN and Inf in the job's tensors",
    )
    c.add_argument("--tag", help="free-form text for the server's log line of the job")
    c.add_argument(
        "--clip-norm", dest="clip_norm", type=float, help="DP-SGD: clip per-sample gradients"
    )
    c.add_argument(
        "--noise-multiplier", dest="noise_multiplier", type=float, help="DP-SGD noise sigma"
    )
    c.add_argument("--noise-seed", dest="noise_seed", type=int, help="seed of the DP noise")
    c.add_argument(
        "--micro-batch-samples",
        dest="micro_batch_samples",
        type=int,
        help="stream the samples in micro-batches of this many (large N)",
    )
    c.add_argument(
        "--optimizer", choices=["sgd", "adam", "adamw"], help="train on the server instead"
    )
    c.add_argument(
        "--steps",
        type=int,
        help="optimiser steps (with --micro-batch-samples: 1, "
        "or the number of micro-batches for a step on each)",
    )
    c.add_argument("--learning-rate", dest="learning_rate", type=float)
    c.add_argument("--momentum", type=float, help="sgd")
    c.add_argument("--dampening", type=float, help="sgd")
    c.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="sgd")
    c.add_argument("--weight-decay", dest="weight_decay", type=float)
    c.add_argument(
        "--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"), help="adam and adamw"
    )
    c.add_argument("--eps", type=float, help="adam and adamw")
    c.add_argument(
        "--start-step",
        dest="start_step",
        type=int,
        help="steps the job file's optimiser state has taken (to continue training; "
        "--parameters-from reads it from the results' summary)",
    )
    c.add_argument(
        "--return-optimizer-state",
        dest="return_optimizer_state",
        action=on_off,
        default=None,
        help="return the optimiser state too (--parameters-from the results continues training)",
    )
    c.add_argument(
        "--parameters-from",
        dest="parameters_from",
        metavar="RESULTS",
        help="take the parameters from an earlier training job's results file (and, when "
        "training, its optimiser state and step count: training continues where it ended)",
    )
    c.set_defaults(run=_compute)

    i = sub.add_parser(
        "info", parents=connection, help="show the server's engines, options and limits"
    )
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=_info)

    h = sub.add_parser(
        "health", parents=connection, help="exit 0 if the server's health service says SERVING"
    )
    h.add_argument("--service", default="", help="service to check (default: the server)")
    h.set_defaults(run=_health)

    b = sub.add_parser("bench", parents=connection, help="drive the server with concurrent clients")
    b.add_argument("--concurrency", type=positive_int, default=64, help="concurrent clients")
    b.add_argument("--jobs-per-client", type=positive_int, default=20)
    b.add_argument("--layer-sizes", type=layer_sizes, default="16,32,32,1")
    b.add_argument("--models", type=positive_int, default=1, help="M of each job")
    b.add_argument("--samples", type=positive_int, default=32, help="N of each job")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=_bench)

    e = sub.add_parser("example", help="write sample job files")
    e.add_argument("directory", nargs="?", default=".")
    e.add_argument("--format", choices=["safetensors", "npz"], default="safetensors")
    e.set_defaults(run=_example)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health" and args.timeout is None:
        args.timeout = 5.0
    try:
        return args.run(args)
    except GradserveError as e:
        print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gradserve-client ... | head`: the reader has all it wants
        # Python would report the unflushed stdout's EPIPE again on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    except (OSError, ValueError) as e:
        print(f"error: {in_flag_terms(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the call is cancelled on the way out (no traceback)
        print("interrupted", file=sys.stderr)
        return 130
