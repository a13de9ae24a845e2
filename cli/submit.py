"""``dmae-certify submit``: a client of a running service (a shared GPU server, or ``make run``).

One image goes to ``POST /certify``; a folder (zipped on the fly), a zip or tar archive, or a
server-side dataset goes to ``POST /evaluations``. It shows a progress bar on stderr while the
server works, then writes the certificate JSON, or the evaluation's TSV and plot. HTTP errors
are printed with the API's own sentence, never a traceback. Ctrl-C leaves the work running on
the server (``--cancel-on-interrupt`` cancels it) and says how to pick it up again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import IO, Any

from cli import DEFAULT_MODEL
from models.modes import MODES, by_family, get_mode

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
KEY_ENV = "DMAE_API_KEY"
ERROR = 1
INTERRUPTED = 130


class SubmitError(Exception):
    """A failure to report in one line (exit 1); ``status``: the HTTP status that caused it."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def register(sub: Any) -> None:
    s = sub.add_parser(
        "submit",
        help="send an image, a folder, an archive or a server dataset to a running service",
        description="Certify through a running dmae-certify service: one image (POST /certify) "
        "or a whole test set (POST /evaluations: an ImageFolder folder, zipped on the fly, a "
        "zip or tar archive, or a dataset on the server). Shows progress on stderr and writes "
        "the certificate JSON, or the evaluation's TSV and plot.",
    )
    s.add_argument("--server", required=True, metavar="URL", help="e.g. http://127.0.0.1:8000")
    s.add_argument(
        "--key",
        default=None,
        help=f"API key (default: the {KEY_ENV} environment variable; keeps it out of the shell "
        "history)",
    )
    _what(s)
    _parameters(s)
    _outputs(s)
    s.set_defaults(func=run)


def _what(s: argparse.ArgumentParser) -> None:
    """What to send or follow: one of --input, --dataset, --job, --evaluation."""
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--input",
        metavar="FILE|FOLDER|ARCHIVE",
        help="an image (one certificate), an ImageFolder folder (one sub-folder per class, "
        "named by the model's class names; zipped and sent as an evaluation), or a zip / tar "
        "(.tar, .tar.gz, .tar.bz2, .tar.xz) of one",
    )
    what.add_argument(
        "--dataset",
        help="a dataset on the server: digits:test, digits:train, mnist:test, mnist:train or a "
        "folder name",
    )
    what.add_argument("--job", metavar="ID", help="follow a job submitted earlier")
    what.add_argument("--evaluation", metavar="ID", help="follow an evaluation submitted earlier")


def _parameters(s: argparse.ArgumentParser) -> None:
    """The run's parameters (each defaults to the server's)."""
    s.add_argument(
        "--model",
        default=None,
        help=f"a registered model (default: the one the server has for --sigma; without "
        f"--sigma, {DEFAULT_MODEL}, as local certify)",
    )
    s.add_argument("--sigma", type=float, default=None, help="noise level (default: the model's)")
    s.add_argument(
        "--mode",
        choices=[m.name for m in by_family()],
        default=None,
        help="what to run (default: the server's, certify)",
    )
    s.add_argument("--target-radius", type=float, default=None, help="decide: the radius")
    s.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="certify modes: per image",
    )
    s.add_argument("--alpha", type=float, default=None, help="(default: the server's, 0.001)")
    s.add_argument("--n0", type=int, default=None, help="(default: the server's, 100)")
    s.add_argument("--n", type=int, default=None, help="(default: the server's, 10000)")
    s.add_argument("--skip", type=int, default=None, help="evaluations: every SKIP-th image")
    s.add_argument("--max", type=int, default=None, help="evaluations: at most this many images")


def _outputs(s: argparse.ArgumentParser) -> None:
    """Where results go, and how the client follows the work."""
    s.add_argument(
        "--out",
        default=None,
        help="write the certificate JSON (one image; default: stdout) or the evaluation's TSV here",
    )
    s.add_argument(
        "--plot", default=None, help="evaluations: write the certified-accuracy PNG here"
    )
    s.add_argument(
        "--skip-invalid",
        action="store_true",
        help="evaluations: a file of the set that is not a supported image (.avif, .heic, "
        ".gif, damaged, outside the layout) refuses the evaluation, naming it; with this flag "
        "the server skips it and lists it (on stderr here, and in the TSV's '# skipped' "
        "footer)",
    )
    s.add_argument("--poll", type=float, default=0.5, help="seconds between status requests")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        help="on Ctrl-C cancel the job or evaluation on the server (default: it keeps running)",
    )


# ---------------------------------------------------------------------------------- HTTP


class Api:
    """The service over HTTP: JSON answers, or SubmitError with the API's ``detail``."""

    def __init__(self, server: str, key: str):
        import httpx

        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers={"X-API-Key": key}, timeout=120)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        for attempt in range(6):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.HTTPError as exc:
                raise SubmitError(f"cannot reach {self.server}: {exc}") from exc
            busy = r.status_code in (429, 503) and method == "GET" and attempt < 5
            if busy:  # rate limit or a brief outage while following: wait as told, then retry
                time.sleep(min(float(r.headers.get("Retry-After") or 1), 30))
                continue
            if r.status_code >= 400:
                raise SubmitError(
                    f"HTTP {r.status_code} from {method} {path}: {_detail(r)}", r.status_code
                )
            return r
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.call(method, path, **kw).json()
        return data


def _detail(r: Any) -> str:
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = None
    return str(detail) if detail else (r.text[:300] or r.reason_phrase)


# ---------------------------------------------------------------------------------- inputs


def _form(args: argparse.Namespace, evaluation: bool) -> dict[str, str]:
    model = DEFAULT_MODEL if args.model is None and args.sigma is None else args.model
    fields = {
        "model": model, "sigma": args.sigma, "mode": args.mode, "alpha": args.alpha,
        "n0": args.n0, "n": args.n, "target_radius": args.target_radius,
        "time_budget_s": args.time_budget,
    }  # fmt: skip
    if evaluation:
        fields.update(skip=args.skip, max=args.max, skip_invalid="true" if args.skip_invalid
                      else None)  # fmt: skip
    elif args.skip is not None or args.max is not None or args.skip_invalid:
        raise ValueError(
            "--skip, --max and --skip-invalid are for evaluations (a folder, archive or --dataset)"
        )
    return {k: str(v) for k, v in fields.items() if v is not None}


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def zip_folder(folder: Path, out: IO[bytes], skip_invalid: bool = False) -> int:
    """Zip the ImageFolder ``folder`` into ``out``: every file under it but hidden and system
    files (``models.data.is_ignored``), at its path under one top folder (as zipping a folder
    gives: ``set/3/a.png``), so that the server applies the one rule for a set's members
    (``models.data.sort_members``) and names any file that is no image. Returns the number of
    files. ValueError when it has no class sub-folders with images, or (unless
    ``skip_invalid``: then each is named on stderr) when an entry is no file at all (a
    dangling link, a FIFO), which no archive can carry."""
    from models.data import (
        IMAGE_SUFFIXES,
        SKIP_INVALID,
        Skipped,
        folder_members,
        refusal,
        sort_members,
    )

    odd: list[Skipped] = []
    members = folder_members(folder, odd)
    if odd and not skip_invalid:
        raise ValueError(f"{folder}: {refusal(odd, SKIP_INVALID)}")
    for s in odd:
        print(f"warning: skipped {s.name}: {s.reason}", file=sys.stderr)
    if not sort_members(members, IMAGE_SUFFIXES, "classes").images:
        raise ValueError(
            f"{folder}: no class sub-folders with images; an evaluation needs one folder per "
            "class named by the model's class names (send single images with --input FILE)"
        )
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:  # images are compressed
        for parts in members:
            archive.write(folder.joinpath(*parts), "/".join(("set", *parts)))
    out.seek(0)
    return len(members)


# ---------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get(KEY_ENV, "")
    if not key:
        raise ValueError(f"give the API key with --key or the {KEY_ENV} environment variable")
    if args.plot and args.mode is not None and not get_mode(args.mode).has_curve:
        raise ValueError(
            "--plot draws certified accuracy against the radius: predict certifies no radius "
            "and decide answers at one radius"
        )
    api = Api(args.server, key)
    kind, ident = "job", ""
    try:
        kind, ident = _submit(api, args)
        if kind == "job":
            return _follow_job(api, args, ident)
        return _follow_evaluation(api, args, ident)
    except SubmitError as exc:
        hint = _other_kind(api, kind, ident) if exc.status == 404 and ident else ""
        print(f"dmae-certify submit: error: {exc}{hint}", file=sys.stderr)
        return ERROR
    except OSError as exc:  # writing --out / --plot
        print(f"dmae-certify submit: error: {exc}", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        return _interrupted(api, args, kind, ident)


def _other_kind(api: Api, kind: str, ident: str) -> str:
    """A sentence when ``ident``, not found as a ``kind``, is the id of the other kind."""
    other = "evaluation" if kind == "job" else "job"
    try:
        api.call("GET", f"/{other}s/{ident}")
    except SubmitError:
        return ""
    article = "an" if other == "evaluation" else "a"
    return f" ({ident} is {article} {other} id: follow it with --{other} {ident})"


def _submit(api: Api, args: argparse.Namespace) -> tuple[str, str]:
    """(kind, id) of the job or evaluation to follow, submitting it first unless given."""
    if args.job:
        return "job", args.job
    if args.evaluation:
        return "evaluation", args.evaluation
    if args.dataset:
        answer = api.json("POST", "/evaluations", data={"dataset": args.dataset,
                                                        **_form(args, True)})  # fmt: skip
        return "evaluation", str(answer["id"])
    path = Path(args.input)
    if path.is_dir():
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
            zip_folder(path, spool, args.skip_invalid)
            return "evaluation", _send_archive(api, args, f"{path.name or 'folder'}.zip", spool)
    if not path.is_file():
        raise ValueError(f"--input {args.input!r} is not a file or a folder")
    with open(path, "rb") as f:
        if is_archive(path):
            return "evaluation", _send_archive(api, args, path.name, f)
        answer = api.json("POST", "/certify", files={"image": (path.name, f)},
                          data=_form(args, False))  # fmt: skip
    return "job", str(answer["id"])


def _send_archive(api: Api, args: argparse.Namespace, name: str, data: Any) -> str:
    files = {"archive": (name, data, "application/octet-stream")}
    answer = api.json("POST", "/evaluations", files=files, data=_form(args, True))
    return str(answer["id"])


def _bar(args: argparse.Namespace, total: int, unit: str, done: int) -> Any:
    """A progress bar that starts at ``done``: its rate counts only the work done while it is
    shown (following a job that finished earlier gave 159,257,407 samples/s)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit=unit, file=sys.stderr,
                disable=args.no_progress, dynamic_ncols=True)  # fmt: skip


def _follow_job(api: Api, args: argparse.Namespace, job_id: str) -> int:
    job = api.json("GET", f"/jobs/{job_id}")
    print(f"# job {job_id} ({job['mode']}, {job['model']}, sigma={job['sigma']:g}, "
          f"n={job['n']})", file=sys.stderr)  # fmt: skip
    bar = _bar(args, job["progress"]["total"], "sample", job["progress"]["done"])
    try:
        while True:
            bar.update(job["progress"]["done"] - bar.n)
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(args.poll)
            job = api.json("GET", f"/jobs/{job_id}")
    finally:
        bar.close()
    if job["status"] != "succeeded" or job.get("certificate") is None:
        why = f": {job['error']}" if job.get("error") else ""
        raise SubmitError(f"job {job_id} {job['status']}{why}")
    text = json.dumps(job["certificate"], indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"certificate written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    print(_outcome(job["certificate"]), file=sys.stderr)
    return 0


def _outcome(cert: dict[str, Any]) -> str:
    from models.evaluate import round_down

    mode = MODES.get(str(cert.get("mode")))  # None: a mode unknown to this client
    if mode is not None and mode.decides:
        return f"{cert.get('decision')} at r={cert.get('target_radius')}"
    if cert["abstained"]:
        return f"abstained ({cert.get('abstain_reason')})"
    if mode is not None and not mode.has_radius:
        return f"predicts {cert.get('label')}"
    radius = round_down(cert["radius"])
    return f"predicts {cert.get('label')}, certified radius {radius} (rounded down)"


def _follow_evaluation(api: Api, args: argparse.Namespace, evaluation_id: str) -> int:
    path = f"/evaluations/{evaluation_id}"
    ev = api.json("GET", path)
    if args.plot and ev["mode"] in MODES and not MODES[ev["mode"]].has_curve:
        raise SubmitError(f"--plot: a {ev['mode']} evaluation has no certified-accuracy curve")
    print(f"# evaluation {evaluation_id}: {ev['progress']['images_total']} image(s) of "
          f"{ev['source']}, {ev['mode']} with {ev['model']}, sigma={ev['sigma']:g} n={ev['n']} "
          f"alpha={ev['alpha']:g}", file=sys.stderr)  # fmt: skip

    def finished(p: dict[str, Any]) -> int:
        return int(p["images_done"] + p["images_failed"] + p.get("images_cancelled", 0))

    bar = _bar(args, ev["progress"]["images_total"], "img", finished(ev["progress"]))
    try:
        while True:
            p = ev["progress"]
            bar.update(finished(p) - bar.n)
            bar.set_postfix_str(f"{p['samples_done']:,} samples", refresh=False)
            if ev["status"] not in ("queued", "running"):
                break
            time.sleep(args.poll)
            ev = api.json("GET", path)
    finally:
        bar.close()
    if args.out:
        Path(args.out).write_bytes(api.call("GET", f"{path}/results.tsv").content)
        print(f"results written to {args.out}", file=sys.stderr)
    if args.plot:
        Path(args.plot).write_bytes(api.call("GET", f"{path}/plot.png").content)
        print(f"plot written to {args.plot}", file=sys.stderr)
    for item in ev.get("skipped") or []:
        print(f"warning: skipped {item['name']}: {item['reason']}", file=sys.stderr)
    print(summary(ev))
    if ev["status"] != "succeeded":
        raise SubmitError(f"evaluation {evaluation_id} {ev['status']}: {ev.get('error') or ''}")
    return 0


def summary(ev: dict[str, Any]) -> str:
    """An evaluation's results for people; fractions and radii rounded down."""
    from models.evaluate import round_down

    p = ev["progress"]
    lines = [f"{ev['status']}: {p['images_done']} of {p['images_total']} image(s) certified, "
             f"{p['samples_done']:,} samples, {ev['time']['compute_s']:.1f} s of jobs, "
             f"{ev['time']['wall_s']:.1f} s wall"
             + (f"; {len(ev['skipped'])} file(s) skipped (not supported images, listed on "
                "stderr)" if ev.get("skipped") else "")]  # fmt: skip
    if ev.get("certified_accuracy"):
        curve = ev["certified_accuracy"]
        lines += [
            "certified accuracy (rounded down):",
            "radius\t" + "\t".join(f"{c['radius']:g}" for c in curve),
            "value\t" + "\t".join(round_down(c["accuracy"], 3) for c in curve),
            f"clean accuracy {round_down(ev['clean_accuracy'], 3)}, abstained "
            f"{round_down(ev['abstention_rate'], 3)}, average certified radius "
            f"{round_down(ev['average_certified_radius'], 3)}",
        ]
    elif ev.get("decisions"):
        d = ev["decisions"]
        lines.append(
            f"decide at r={ev['target_radius']:g}: certified {round_down(d['certified'], 3)}, "
            f"not certified {round_down(d['not_certified'], 3)}, undecided "
            f"{round_down(d['undecided'], 3)}, certified accuracy "
            f"{round_down(d['certified_accuracy'], 3)}; n_used median {d['n_used_median']:g}, "
            f"mean {d['n_used_mean']:.1f}, {d['samples_saved']:.1f}x fewer forward passes in "
            "all than fixed-n CERTIFY"
        )
    elif ev.get("clean_accuracy") is not None:
        lines.append(f"accuracy {round_down(ev['clean_accuracy'], 3)}, abstained "
                     f"{round_down(ev['abstention_rate'], 3)}")  # fmt: skip
    return "\n".join(lines)


def _program() -> str:
    """The command as the user ran it (``.venv/bin/dmae-certify``), so the hint pastes as is."""
    ran = sys.argv[0] if sys.argv and sys.argv[0].endswith("dmae-certify") else ""
    return ran or "dmae-certify"


def _interrupted(api: Api, args: argparse.Namespace, kind: str, ident: str) -> int:
    if not ident:
        print("interrupted before anything was submitted", file=sys.stderr)
        return INTERRUPTED
    path = f"/{'jobs' if kind == 'job' else 'evaluations'}/{ident}"
    if args.cancel_on_interrupt:
        try:
            api.call("DELETE", path)
            print(f"interrupted: {kind} {ident} cancelled on the server", file=sys.stderr)
        except SubmitError as exc:
            print(f"interrupted: could not cancel {kind} {ident}: {exc}", file=sys.stderr)
        return INTERRUPTED
    again = f"{_program()} submit --server {api.server} --{kind} {ident}"
    for flag in ("out", "plot"):
        if getattr(args, flag):
            again += f" --{flag} {getattr(args, flag)}"
    print(
        f"interrupted: {kind} {ident} keeps running on the server; follow it later with\n"
        f"  {again}\nor cancel it with: curl -X DELETE -H 'X-API-Key: ...' {api.server}{path}",
        file=sys.stderr,
    )
    return INTERRUPTED
