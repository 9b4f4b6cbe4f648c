"""Bad and unusual inputs through the real `boothkit` CLI: issue 9's acceptance script (kept in CI as a test).

Every case runs `boothkit.cli.main(argv)` in this one process (imports are paid once) on tiny random models
built in a temporary folder, with stdout, stderr and the `boothkit` logger captured. Each case states what
it EXPECTS: "error" (a non-zero exit with one `error:` line) or "ok" (exit 0), or "either" where both are
fine as long as nothing is lost. A row fails when

* a traceback escaped (an exception out of `main`, or "Traceback" in the output);
* a pre-existing file changed: every file of the case's inputs (photos, prompt files, models, LoRAs) and
  every "user" file planted in an output folder (notes.txt, a photo, weak/README ...) is hashed before and
  after the run;
* something non-finite was written: every new or changed .safetensors is scanned for NaN/inf, and every
  .json/.csv for NaN/Infinity values;
* an "error" case exited 0 (silently wrong), an "ok" case failed, an error was not one `error:` line, the
  output does not mention what it must (the lock's holder, what differs on resume, the token limit ...), or
  an after-run check of the outputs failed (e.g. samples.json and the images disagree).

    python bench/bad_inputs.py [--json PATH] [--only WORD] [--keep DIR]

Prints one row per case (verdict, exit code, expectation, description, the command, the first line of
output: the `error:` line when there is one), the failing rows again, and counts. Exit status 1 if any row
fails. Running as root, chmod cannot make a folder read-only, so that case uses a path below a regular file.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail fast, not wait for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

from boothkit import cli  # noqa: E402

CATEGORIES = ("traceback", "changed file", "non-finite written", "silently wrong", "unexpected error",
              "unclear error", "missing mention", "setup failed")


@dataclass
class Row:
    index: int
    command: str
    name: str
    expect: str
    argv: list[str]
    exit_code: int | None = None
    first_line: str = ""
    changed: list[str] = field(default_factory=list)
    traceback: bool = False
    non_finite: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    @property
    def verdict(self) -> str:
        return "FAIL" if self.problems else "pass"


# ----------------------------------------------------------------------------------------------- files


def snapshot(paths: list[Path]) -> dict[Path, str]:
    """sha256 of every file at or below `paths` (hidden files too)."""
    hashes = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in files:
            with contextlib.suppress(OSError):
                hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def changed_files(before: dict[Path, str], after: dict[Path, str]) -> list[str]:
    return [f"{path} ({'deleted' if path not in after else 'modified'})"
            for path, digest in before.items() if after.get(path) != digest]


def _non_finite_json(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return value.strip().lower() in {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}
    if isinstance(value, dict):
        return any(_non_finite_json(item) for item in value.values())
    if isinstance(value, list):
        return any(_non_finite_json(item) for item in value)
    return False


def _non_finite_csv(text: str) -> bool:
    import csv

    for row in csv.reader(io.StringIO(text)):
        for cell in row:
            with contextlib.suppress(ValueError):
                if not math.isfinite(float(cell)):
                    return True
    return False


def _non_finite_safetensors(path: Path) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return True
    return False


def non_finite(path: Path) -> bool:
    """Whether a written .safetensors/.json/.csv holds NaN or ±inf (an unreadable one counts as clean)."""
    try:
        if path.suffix == ".safetensors":
            return _non_finite_safetensors(path)
        if path.suffix == ".json":
            return _non_finite_json(json.loads(path.read_text(encoding="utf-8")))
        if path.suffix == ".csv":
            return _non_finite_csv(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - a damaged file is a different problem; not a NaN
        return False
    return False


# -------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def captured_cli_output() -> "contextlib.Iterator[tuple[io.StringIO, io.StringIO]]":
    """Redirect stdout/stderr, and point the `boothkit` logger's stream handlers at the captured stderr
    (wherever `main` configures them)."""
    out, err = io.StringIO(), io.StringIO()
    original = getattr(cli, "_configure_logging", None)

    def configure_then_capture() -> None:
        original()
        for handler in logging.getLogger("boothkit").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(err)

    fallback = logging.StreamHandler(err)
    if original is not None:
        cli._configure_logging = configure_then_capture
    else:
        logging.getLogger("boothkit").addHandler(fallback)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        if original is not None:
            cli._configure_logging = original
        logging.getLogger("boothkit").removeHandler(fallback)
        for handler in logging.getLogger("boothkit").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is err:
                handler.setStream(sys.__stderr__)


def invoke(argv: list[str]) -> tuple[int | None, str, str, str | None]:
    """(exit code, stdout, stderr, traceback text or None) of `boothkit ARGV`."""
    tb = None
    with captured_cli_output() as (out, err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse's --help / --version
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception:  # noqa: BLE001 - an escaping exception IS the traceback we look for
            tb, code = traceback.format_exc(), None
    return code, out.getvalue(), err.getvalue(), tb


def first_line(out: str, err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if errors:
        return errors[0]
    for text in (out, err):
        lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        if lines:
            return lines[0]
    return ""


_PROGRESS_BAR = re.compile(r"\d+%\||it/s\b|s/it\b")


def message_lines(text: str) -> list[str]:
    """The lines of output that are messages, not progress bars (whose rates could match a number)."""
    return [line for chunk in text.splitlines() for line in chunk.split("\r")
            if line.strip() and not _PROGRESS_BAR.search(line)]


def judge(row: Row, case: Case, ctx: Ctx, out: str, err: str, tb: str | None) -> None:
    text = out + err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    if tb or "Traceback" in text:
        row.traceback = True
        row.problems.append("traceback")
        if tb:
            row.first_line = "exception: " + tb.strip().splitlines()[-1]
    if row.changed:
        row.problems.append("changed file")
    if row.non_finite:
        row.problems.append("non-finite written")
    if row.exit_code is None:
        return
    if case.expect == "error" and row.exit_code == 0:
        row.problems.append("silently wrong")
    elif case.expect == "ok" and row.exit_code != 0:
        row.problems.append("unexpected error")
    elif row.exit_code != 0 and len(error_lines) != 1:
        row.problems.append("unclear error")
    lines = message_lines(text)
    if case.says and (row.exit_code == 0) == (case.expect == "ok") and not any(
            re.search(pattern, line, re.IGNORECASE) for pattern in case.says for line in lines):
        row.problems.append(f"missing mention: output does not mention {' or '.join(map(repr, case.says))}")
    if case.check is not None and row.exit_code == 0 and case.expect != "error":
        problem = case.check(ctx, out, err)
        if problem:
            row.problems.append(f"silently wrong: {problem}")


def run_case(index: int, case: Case, workspace: Workspace) -> Row:
    ctx = Ctx(workspace, workspace.root / "cases" / f"{index:03d}")
    row = Row(index, case.command, case.name, case.expect, [], note=case.note)
    try:
        row.argv = [str(arg) for arg in case.build(ctx)]
    except Exception as error:  # noqa: BLE001
        row.first_line = f"setup: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
        row.problems.append("setup failed")
        return row
    row.note = ctx.note or row.note
    protected = ctx.protect + [workspace.shared]
    before, before_written = snapshot(protected), snapshot([ctx.dir])
    start = time.perf_counter()
    row.exit_code, out, err, tb = invoke(row.argv)
    row.seconds = time.perf_counter() - start
    row.first_line = first_line(out, err)
    row.changed = changed_files(before, snapshot(protected))
    written = snapshot([ctx.dir])
    row.non_finite = [str(path) for path, digest in written.items()
                      if before_written.get(path) != digest and non_finite(path)]
    judge(row, case, ctx, out, err, tb)
    return row


def run_cases(only: str | None = None, keep: str | None = None, echo: Callable[[str], None] | None = print) -> list[Row]:
    """Build the tiny models, run every case (those whose text contains `only`), return the rows."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="boothkit-bad-inputs-"))
    try:
        workspace = Workspace(root)
        rows = []
        for index, case in enumerate(CASES, 1):
            if only and only.lower() not in f"{case.command} {case.name}".lower():
                continue
            row = run_case(index, case, workspace)
            rows.append(row)
            if echo:
                echo(format_row(row, root))
        return rows
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------- fixtures and cases


def image_bytes(kind: str) -> bytes:
    """A photo of the sample subject in an unusual form, or a broken file."""
    import numpy as np
    from PIL import Image

    from boothkit.data.images import sample_subject_dir

    source = sorted(sample_subject_dir().glob("*.jpg"))[0]
    if kind == "jpg":
        return source.read_bytes()
    if kind == "corrupt":
        return b"this is not an image\n"
    if kind == "truncated":
        return source.read_bytes()[:400]
    photo, buffer = Image.open(source).convert("RGB"), io.BytesIO()
    if kind == "cmyk":
        photo.convert("CMYK").save(buffer, "JPEG")
    elif kind == "16bit":
        gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(buffer, "PNG")  # mode I;16
    elif kind == "rgba":
        rgba = photo.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
        rgba.save(buffer, "PNG")
    elif kind == "tiny":
        photo.resize((8, 8)).save(buffer, "PNG")
    elif kind == "flipped":
        photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer, "JPEG")
    else:
        raise ValueError(kind)
    return buffer.getvalue()


class Workspace:
    """Tiny models, photos and LoRAs shared by the cases (built when first needed; hashed around every case),
    and earlier runs that cases copy before changing them."""

    def __init__(self, root: Path):
        self.root, self.shared = root, root / "shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self._built: dict[str, Path | Exception] = {}

    def cli(self, *argv) -> None:
        code, out, err, tb = invoke([str(arg) for arg in argv])
        if code != 0:
            why = tb.strip().splitlines()[-1] if tb else first_line(out, err)
            raise RuntimeError(f"boothkit {argv[0]} failed (exit {code}): {why}")

    def _once(self, name: str, build: Callable[[Path], None], where: Path | None = None) -> Path:
        """Build `name` the first time it is asked for; a build that failed fails again the same way."""
        if name not in self._built:
            path = (where or self.shared) / name
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    build(path)
                self._built[name] = path
            except Exception as error:  # noqa: BLE001
                self._built[name] = error
        if isinstance(self._built[name], Exception):
            raise self._built[name]
        return self._built[name]

    def model(self, kind: str, seed: int = 0) -> Path:
        from boothkit.testing.tiny import build_tiny

        return self._once(f"{kind}-{seed}", lambda path: build_tiny(kind, path, seed=seed))

    @property
    def sd15(self) -> Path:
        return self.model("sd15")

    @property
    def photos(self) -> Path:
        from boothkit.data.images import sample_subject_dir

        return self._once("photos", lambda path: shutil.copytree(sample_subject_dir(), path))

    def train_args(self, model: Path, photos: Path, out: Path, *extra) -> list:
        return ["train", "--pretrained_model_name_or_path", model, "--instance_data_dir", photos,
                "--instance_prompt", "a photo of sks dog", "--output_dir", out, "--max_train_steps", 2,
                "--resolution", 32, *extra]

    def lora(self, kind: str = "sd15") -> Path:
        """A LoRA (with weak/) trained for 3 steps on the tiny `kind` model."""
        return self._once(f"lora-{kind}", lambda path: self.cli(*self.train_args(
            self.model(kind), self.photos, path, "--max_train_steps", 3, "--weak_checkpoint_step", 1)))

    def run(self, name: str) -> Path:
        """An earlier run's output folder (copied by the cases that change it)."""
        seeds = self.root / "seeds"
        runs = {
            "train": lambda path: self.cli(*self.train_args(self.sd15, self.photos, path,
                                                            "--checkpointing_steps", 1)),
            "sample": lambda path: self.cli(*sample_argv(self, path, "--prompt", "a sks dog", "--prompt",
                                                         "a sks dog in the snow", "--prompt", "a red sks dog")),
            "evaluate": lambda path: self.cli(*evaluate_argv(self, self.eval_layout(), path)),
        }
        return self._once(f"run-{name}", runs[name], seeds)

    def eval_layout(self) -> dict[str, Path]:
        """instance/dog2 (photos), loras/dog2 (LoRA with weak/), prompts.json: the seed's layout."""
        def build(path: Path) -> None:
            shutil.copytree(self.photos, path / "instance" / "dog2")
            shutil.copytree(self.lora(), path / "loras" / "dog2", ignore=shutil.ignore_patterns("checkpoint-*"))
            (path / "prompts.json").write_text(json.dumps(
                {"subjects": ["dog"], "prompts": ["a <subject> in the jungle", "a red <subject>"]}))
        root = self._once("eval-layout", build)
        return {"instance": root / "instance", "loras": root / "loras", "prompts": root / "prompts.json"}


class Ctx:
    """A case's own folder; what it plants there and marks `protect` is hashed before and after the run."""

    def __init__(self, workspace: Workspace, folder: Path):
        self.ws, self.dir = workspace, folder
        folder.mkdir(parents=True)
        self.protect: list[Path] = []
        self.note = ""

    def keep(self, path: Path) -> Path:
        self.protect.append(path)
        return path

    def photos(self, name: str = "photos") -> Path:
        return self.keep(shutil.copytree(self.ws.photos, self.dir / name))

    def folder(self, name: str, files: dict[str, bytes | str]) -> Path:
        """A folder of user files (all protected)."""
        root = self.dir / name
        root.mkdir(parents=True, exist_ok=True)
        for relative, content in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            self.keep(path)
        return root

    def file(self, name: str, content: bytes | str) -> Path:
        return self.folder(".", {name: content}) / name

    def copy(self, source: Path, name: str = "out", protect: bool = False) -> Path:
        target = shutil.copytree(source, self.dir / name)
        return self.keep(target) if protect else target

    def lock(self, folder: Path, pid: int, host: str | None = None) -> Path:
        record = {"pid": pid, "host": host or socket.gethostname(), "command": "train"}
        return self.file(str((folder / ".boothkit.lock").relative_to(self.dir)), json.dumps(record))

    def user_files(self, folder: Path, *names: str) -> Path:
        """Plant a user's files in an output folder: text for most names, a photo for .jpg/.png."""
        self.folder(str(folder.relative_to(self.dir)), {
            name: image_bytes("jpg") if name.endswith((".jpg", ".png")) else f"user file {name}\n" for name in names})
        return folder


USER_FILES = ("notes.txt", "my_photo.jpg")


def sample_argv(ws: Workspace, out: Path, *extra, lora: Path | None | str = "sd15", model: Path | None = None) -> list:
    lora_flags = [] if lora is None else ["--lora_dir", ws.lora(lora) if isinstance(lora, str) else lora]
    return ["sample", "--pretrained_model_name_or_path", model or ws.sd15, *lora_flags, "--output_dir", out,
            "--num_inference_steps", 2, "--height", 32, "--width", 32, *extra]


def evaluate_argv(ws: Workspace, layout: dict[str, Path], out: Path, *extra) -> list:
    return ["evaluate", "--pretrained_model_name_or_path", ws.sd15, "--lora_base_dir", layout["loras"],
            "--instance_data_dir", layout["instance"], "--evaluation_prompts_path", layout["prompts"],
            "--output_dir", out, "--dino_model", ws.model("dino"), "--clip_model", ws.model("clip"),
            "--num_inference_steps", 2, "--height", 32, "--width", 32, "--max_prompts", 1, *extra]


def own_layout(c: Ctx, weak: bool = True, prompts: str | None = None, folder: str = "dog2") -> dict[str, Path]:
    """A protected copy of the evaluation layout in the case's folder (with another prompts file or no weak/)."""
    shared = c.ws.eval_layout()
    instance = c.photos(f"instance/{folder}").parent
    loras = c.copy(shared["loras"], "loras", protect=True)
    if folder != "dog2":
        (loras / "dog2").rename(loras / folder)
    if not weak:
        shutil.rmtree(loras / folder / "weak")
    path = c.file("prompts.json", prompts if prompts is not None else shared["prompts"].read_text())
    return {"instance": instance, "loras": loras, "prompts": path}


@dataclass
class Case:
    command: str
    name: str
    expect: str  # "ok" | "error" | "either"
    build: Callable[[Ctx], list]  # plants the case's files, returns argv
    says: tuple[str, ...] = ()  # a line of output (not a progress bar) must match one of these regexes
    check: Callable[[Ctx, str, str], str | None] | None = None  # after exit 0: a problem, or None
    note: str = ""


CASES: list[Case] = []


def case(command: str, name: str, expect: str, build: Callable[[Ctx], list], says=(), check=None, note="") -> None:
    CASES.append(Case(command, name, expect, build, tuple(says), check, note))


# ---------------------------------------------------------------------------------------- checks


def help_is_complete(boolean_flag: str | None) -> Callable[[Ctx, str, str], str | None]:
    """--help shows real defaults, and both forms of a boolean flag of the command's schema."""
    def check(c: Ctx, out: str, err: str) -> str | None:
        if "PydanticUndefined" in out:
            return "help shows '(default: PydanticUndefined)'"
        if boolean_flag and f"--no_{boolean_flag}" not in out:
            return f"help hides --no_{boolean_flag} (the --no_... form of boolean flags)"
        return None
    return check


def samples_agree(c: Ctx, out: str, err: str) -> str | None:
    folder = c.dir / "out"
    on_disk = {path.name for path in folder.glob("*.png")}
    listed = {record["file"] for record in json.loads((folder / "samples.json").read_text())}
    if on_disk != listed:
        return f"images not in samples.json: {sorted(on_disk - listed)}; listed but missing: {sorted(listed - on_disk)}"
    return None


def ag_has_its_own_default(c: Ctx, out: str, err: str) -> str | None:
    scale = json.loads((c.dir / "out" / "samples.json").read_text())[0]["guidance_scale"]
    return None if 1.0 <= scale <= 3.0 else f"--method ag defaulted λ to {scale} (AG's useful range is about 1-3)"


def files_follow_the_umask(c: Ctx, out: str, err: str) -> str | None:
    mask = os.umask(0)
    os.umask(mask)
    wrong = [f"{path.relative_to(c.dir)} ({oct(path.stat().st_mode & 0o777)})" for path in (c.dir / "out").rglob("*")
             if path.is_file() and path.stat().st_mode & 0o777 != 0o666 & ~mask]
    return f"files not written with the umask {oct(mask)}: {wrong[:3]}" if wrong else None


def score_is_finite(c: Ctx, out: str, err: str) -> str | None:
    scores = json.loads(out.strip().splitlines()[-1])
    bad = {key: value for key, value in scores.items() if isinstance(value, float) and not math.isfinite(value)}
    return f"non-finite scores {bad}" if bad else None


LONG_PROMPT = "a photo of sks dog " + " ".join(["sitting on a very long and winding road"] * 20)
TOKEN_LIMIT_WARNING = r"\b77\b.*token|token.*\b77\b"  # the tiny CLIP text encoder reads 77 tokens
PID_ALIVE = os.getppid()  # our parent: a live process of this host other than us (a lock naming our own pid is stale)


# ------------------------------------------------------------------------------------------ the cases


def _general_cases() -> None:
    case("boothkit", "--help", "ok", lambda c: ["--help"])
    case("boothkit", "--version", "ok", lambda c: ["--version"], note="issue 9 §6")
    case("boothkit", "no arguments", "error", lambda c: [])
    case("boothkit", "unknown command", "error", lambda c: ["frobnicate"])
    for command, boolean_flag in [("train", "cache_latents"), ("sample", "overwrite"), ("evaluate", "keep_identifier"),
                                  ("score", "keep_identifier"), ("tiny", None)]:
        case(command, "--help shows real defaults and --no_ switches", "ok", lambda c, cmd=command: [cmd, "--help"],
             check=help_is_complete(boolean_flag))


def _train(c: Ctx, *extra, photos: Path | None = None, out: Path | None = None, model: Path | None = None) -> list:
    return c.ws.train_args(model or c.ws.sd15, photos or c.photos(), out or c.dir / "out", *extra)


def _photo_folder(c: Ctx, *kinds: str) -> Path:
    return c.folder("photos", {f"{index:02d}_{kind}.{'jpg' if kind in ('jpg', 'cmyk', 'truncated') else 'png'}":
                               image_bytes(kind) for index, kind in enumerate(kinds)})


def _train_input_cases() -> None:
    case("train", "plain run (files follow the user's umask)", "ok", lambda c: _train(c), check=files_follow_the_umask)
    case("train", "missing instance folder", "error", lambda c: _train(c, photos=c.dir / "no_such_folder"))
    case("train", "empty instance folder", "error", lambda c: _train(c, photos=c.folder("photos", {})))
    case("train", "folder of non-images", "error",
         lambda c: _train(c, photos=c.folder("photos", {"a.txt": "hello", "b.csv": "1,2\n"})))
    case("train", "only corrupt images", "error", lambda c: _train(c, photos=_photo_folder(c, "corrupt", "truncated")))
    case("train", "CMYK, 16-bit, RGBA and 8x8 photos and a corrupt file (skipped, warned)", "ok",
         lambda c: _train(c, photos=_photo_folder(c, "cmyk", "16bit", "rgba", "tiny", "corrupt")), says=("skipping",))
    case("train", "unknown model path", "error", lambda c: _train(c, model=c.dir / "no_such_model"))
    case("train", "hub id that cannot be reached (offline)", "error", lambda c: _train(c, model="nobody/no-such-model"))
    case("train", "a file given as model", "error", lambda c: _train(c, model=c.file("model.ckpt", b"\0" * 64)),
         says=("is a file", "not a folder", "not a directory"))
    case("train", "non-diffusers folder as model", "error", lambda c: _train(c, model=c.folder(
        "model", {"config.json": '{"hidden_size": 4}', "weights.bin": b"\0" * 16})))
    case("train", "transformers model (DINO) as model", "error", lambda c: _train(c, model=c.ws.model("dino")))
    case("train", "diffusers folder without its unet", "error",
         lambda c: _train(c, model=_copy_without(c, c.ws.sd15, "model", "unet")), says=("unet",))
    case("train", "--instance_prompt longer than the token limit (warns)", "ok",
         lambda c: _train(c, "--instance_prompt", LONG_PROMPT), says=(TOKEN_LIMIT_WARNING,))


def _train_number_cases() -> None:
    for flags, names in [
        (["--learning_rate", "nan"], ("learning_rate",)), (["--learning_rate", "inf"], ("learning_rate",)),
        (["--learning_rate", "-1e-4"], ("learning_rate",)), (["--max_grad_norm", "nan"], ("max_grad_norm",)),
        (["--prior_loss_weight", "inf"], ("prior_loss_weight",)), (["--lora_alpha", "nan"], ("lora_alpha",)),
        (["--resolution", "0"], ("resolution",)), (["--resolution", "33"], ("resolution",)),
        (["--max_train_steps", "0"], ("max_train_steps",)), (["--max_train_steps", "1e3"], ("max_train_steps",)),
        (["--rank", "0"], ("rank",)), (["--train_batch_size", "0"], ("train_batch_size",)),
        (["--seed", "-1"], ("seed",)), (["--weak_checkpoint_step", "5"], ("weak_checkpoint_step",)),
        (["--lr_scheduler", "nonsense"], ("lr_scheduler",)), (["--lora_layers", "no_such_module"], ("no_such_module",)),
        (["--learnig_rate", "1e-4"], ("learnig_rate",)),
        (["--with_prior_preservation", "--class_data_dir", "classes"], ("class_prompt",)),
    ]:
        case("train", " ".join(flags), "error", lambda c, flags=flags: _train(c, *flags), says=names)
    case("train", "--mixed_precision fp16 on a CPU", "error", lambda c: _train(c, "--mixed_precision", "fp16"),
         says=("GPU",), note="fp16 kernels are GPU-only; the README's commands no longer use fp16 (issue 9 §6)")
    config_cases = [("typo in a --config key", "learnig_rate: 0.0001\n", ("learnig_rate",)),
                    ("malformed YAML --config", "max_train_steps: [2\nrank: 4\n", ("config",)),
                    ("--config with learning_rate: .nan", "learning_rate: .nan\n", ("learning_rate",)),
                    ("--config that is a list", "- 1\n- 2\n", ("config",))]
    for name, text, says in config_cases:
        case("train", name, "error", lambda c, text=text: _train(c, "--config", c.file("config.yaml", text)), says=says)
    case("train", "--config file missing", "error", lambda c: _train(c, "--config", c.dir / "missing.yaml"))


def _train_output_cases() -> None:
    case("train", "output folder with user files, no --overwrite", "error",
         lambda c: _train(c, out=c.user_files(c.dir / "out", *USER_FILES)))
    case("train", "output folder with user files, --overwrite (they survive)", "ok",
         lambda c: _train(c, "--overwrite", out=c.user_files(c.dir / "out", *USER_FILES)))
    case("train", "--overwrite an earlier run holding user files in weak/, validation/, checkpoint-1/", "ok",
         lambda c: _train(c, "--overwrite", out=c.user_files(c.copy(c.ws.run("train")), "notes.txt", "weak/README",
                                                             "validation/notes.txt", "checkpoint-1/mine.png")))
    case("train", "--output_dir is the photos folder", "error", lambda c: _train(c, out=c.dir / "photos"))
    case("train", "--output_dir is the photos folder, --overwrite (photos survive)", "either",
         lambda c: _train(c, "--overwrite", out=c.dir / "photos"))
    case("train", "--output_dir is a regular file", "error", lambda c: _train(c, out=c.file("out", "mine")))
    case("train", "--output_dir below a regular file", "error", lambda c: _train(c, out=c.file("f", "x") / "out"))
    case("train", "read-only output folder", "error", _read_only_output)
    case("train", "second run while the first holds the lock", "error", lambda c: _train(
        c, "--overwrite", out=_locked(c, c.copy(c.ws.run("train")), PID_ALIVE)), says=(rf"\b{PID_ALIVE}\b",))
    case("train", "stale lock (dead pid) is taken over with a notice", "ok", lambda c: _train(
        c, "--overwrite", out=_locked(c, c.copy(c.ws.run("train")), _dead_pid(), protect=False)), says=("lock",))
    case("train", "lock held on another host", "error", lambda c: _train(
        c, "--overwrite", out=_locked(c, c.copy(c.ws.run("train")), 1, host="another-host")), says=("another-host",))


def _copy_without(c: Ctx, source: Path, name: str, part: str) -> Path:
    """A protected copy of `source` without its `part` (a damaged model, a LoRA without weak/)."""
    folder = c.copy(source, name, protect=True)
    shutil.rmtree(folder / part)
    return folder


def _locked(c: Ctx, folder: Path, pid: int, host: str | None = None, protect: bool = True) -> Path:
    lock = c.lock(folder, pid, host)
    if not protect:
        c.protect.remove(lock)
    return folder


def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _read_only_output(c: Ctx) -> list:
    if os.geteuid() == 0:
        c.note = "running as root (chmod does not stop root): simulated with an output path below a regular file"
        return _train(c, out=c.file("readonly", "x") / "out")
    folder = c.dir / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    return _train(c, out=folder / "out")


def _resume_cases() -> None:
    def resume(c: Ctx, *extra, photos=None, model=None, ok: bool = False) -> list:
        out = c.copy(c.ws.run("train"), protect=not ok)
        return _train(c, "--resume_from_checkpoint", "latest", "--max_train_steps", 3, "--checkpointing_steps", 1,
                      *extra, photos=photos, out=out, model=model)

    case("train", "resume the same run (photos copied elsewhere)", "ok", lambda c: resume(c, ok=True))
    case("train", "resume a run that had other photos", "error",
         lambda c: resume(c, photos=_photo_folder(c, "jpg", "flipped")), says=("photo", "instance"))
    case("train", "resume a run that had another prompt", "error",
         lambda c: resume(c, "--instance_prompt", "a photo of zwx cat"), says=("prompt",))
    case("train", "resume a run that had another seed", "error", lambda c: resume(c, "--seed", 7), says=("seed",))
    case("train", "resume a run of another model", "error", lambda c: resume(c, model=c.ws.model("sd15", seed=1)),
         says=("model",))
    case("train", "resume a run at another resolution", "error", lambda c: resume(c, "--resolution", 64),
         says=("resolution",))
    case("train", "--resume_from_checkpoint of a missing folder", "error",
         lambda c: _train(c, "--resume_from_checkpoint", c.dir / "checkpoint-9"))


def _sample(c: Ctx, *extra, **kwargs) -> list:
    return sample_argv(c.ws, kwargs.pop("out", c.dir / "out"), *extra, **kwargs)


def _sample_cases() -> None:
    prompt = ("--prompt", "a sks dog")
    case("sample", "plain cfg", "ok", lambda c: _sample(c, *prompt), check=samples_agree)
    case("sample", "--method wig without --lora_dir", "error", lambda c: _sample(c, *prompt, "--method", "wig", lora=None),
         says=("lora",))
    case("sample", "--method ag without a weak LoRA", "error", lambda c: _sample(
        c, *prompt, "--method", "ag", lora=_copy_without(c, c.ws.lora(), "lora", "weak")), says=("weak",))
    case("sample", "--method ag without --guidance_scale uses AG's own default", "ok",
         lambda c: _sample(c, *prompt, "--method", "ag"), check=ag_has_its_own_default)
    case("sample", "LoRA of another model (SANA LoRA on SD 1.5)", "error", lambda c: _sample(c, *prompt, lora="sana"))
    case("sample", "LoRA of another model (SD 1.5 LoRA on SANA)", "error",
         lambda c: _sample(c, *prompt, model=c.ws.model("sana")))
    case("sample", "--lora_dir missing", "error", lambda c: _sample(c, *prompt, lora=c.dir / "no_lora"))
    case("sample", "--lora_dir empty", "error", lambda c: _sample(c, *prompt, lora=c.folder("lora", {})))
    case("sample", "SANA LoRA without train_config.json or metadata (says what it assumed)", "ok",
         lambda c: _sample(c, *prompt, model=c.ws.model("sana"), lora=_bare_lora(c, c.ws.lora("sana"))),
         says=("complex_human_instruction",))
    for flags, says in [
        (["--guidance_scale", "nan"], ("guidance_scale",)), (["--guidance_scale", "inf"], ("guidance_scale",)),
        (["--guidance_scale", "1e400"], ("guidance_scale",)), (["--method", "ag", "--cfg_scale", "nan"], ("cfg_scale",)),
        (["--method", "wig", "--omega", "2"], ("omega",)), (["--method", "wig", "--omega", "nan"], ("omega",)),
        (["--height", "30"], ("height",)), (["--num_inference_steps", "0"], ("num_inference_steps",)),
        (["--num_images_per_prompt", "0"], ("num_images_per_prompt",)), (["--batch_size", "0"], ("batch_size",)),
        (["--scheduler", "nonsense"], ("scheduler",)), (["--seed", "1.5"], ("seed",)),
        (["--weak_checkpoint_path", "no_such_weak", "--method", "ag"], ("no_such_weak",)),
    ]:
        case("sample", " ".join(flags), "error", lambda c, flags=flags: _sample(c, *prompt, *flags), says=says)
    case("sample", "--mixed_precision fp16 on a CPU", "either", lambda c: _sample(c, *prompt, "--mixed_precision", "fp16"))
    case("sample", "no prompt at all", "error", lambda c: _sample(c))
    case("sample", "prompt longer than the token limit (warns)", "ok", lambda c: _sample(c, "--prompt", LONG_PROMPT + " in the snow"),
         says=(TOKEN_LIMIT_WARNING,))
    for what, name, content in [
        ("not UTF-8", "prompts.txt", b"\xff\xfea sks dog\x80\n"), ("malformed JSON", "prompts.json", '["a sks dog", '),
        ("empty", "prompts.txt", ""), ("only comments and blank lines", "prompts.txt", "# prompts\n\n"),
        ("JSON list of numbers", "prompts.json", "[1, 2]"),
    ]:
        case("sample", f"prompts file: {what}", "error",
             lambda c, name=name, content=content: _sample(c, "--prompts_file", c.file(name, content)))
    case("sample", "prompts file missing", "error", lambda c: _sample(c, "--prompts_file", c.dir / "missing.txt"))
    _sample_output_cases(prompt)


def _bare_lora(c: Ctx, lora: Path) -> Path:
    """The LoRA file alone, without boothkit's metadata (as the diffusers example would save it)."""
    from safetensors.torch import load_file, save_file

    folder = c.dir / "bare_lora"
    folder.mkdir()
    save_file(load_file(lora / "pytorch_lora_weights.safetensors"), folder / "pytorch_lora_weights.safetensors")
    return c.keep(folder)


def _sample_output_cases(prompt: tuple[str, str]) -> None:
    case("sample", "output folder with user files, no --overwrite", "error",
         lambda c: _sample(c, *prompt, out=c.user_files(c.dir / "out", *USER_FILES)))
    case("sample", "output folder with user files, --overwrite (they survive)", "ok",
         lambda c: _sample(c, *prompt, "--overwrite", out=c.user_files(c.dir / "out", "notes.txt", "my_photo.jpg")))
    case("sample", "--overwrite an earlier run with fewer prompts: folder == samples.json", "ok",
         lambda c: _sample(c, *prompt, "--overwrite", out=c.copy(c.ws.run("sample"))), check=samples_agree)
    case("sample", "rerun into an earlier run without --overwrite", "error",
         lambda c: _sample(c, *prompt, out=c.copy(c.ws.run("sample"), protect=True)))
    case("sample", "--output_dir is the LoRA folder, --overwrite (LoRA survives)", "either",
         lambda c: _sample(c, *prompt, "--overwrite", out=c.copy(c.ws.lora(), "lora", protect=True)))
    case("sample", "--output_dir is the photos folder", "error", lambda c: _sample(c, *prompt, out=c.photos()))
    case("sample", "--output_dir below a regular file", "error", lambda c: _sample(c, *prompt, out=c.file("f", "x") / "o"))
    case("sample", "second run while the first holds the lock", "error", lambda c: _sample(
        c, *prompt, "--overwrite", out=_locked(c, c.copy(c.ws.run("sample")), PID_ALIVE)), says=(rf"\b{PID_ALIVE}\b",))


def _score(c: Ctx, *extra, images: Path | None = None, references: Path | None = None) -> list:
    return ["score", "--images", images or c.photos("images"), "--references", references or c.photos("references"),
            "--dino_model", c.ws.model("dino"), "--clip_model", c.ws.model("clip"), *extra]


def _score_cases() -> None:
    case("score", "photos against themselves, with a prompt", "ok", lambda c: _score(c, "--prompt", "a sks dog"),
         check=score_is_finite)
    for kind in ("cmyk", "16bit", "rgba", "tiny", "truncated"):
        case("score", f"{kind} image among the references", "ok", lambda c, kind=kind: _score(
            c, references=_photo_folder(c, "jpg", kind)), check=score_is_finite)
    case("score", "images with .JPG/.JPEG names and a .DS_Store", "ok", lambda c: _score(c, images=c.folder("images", {
        "A.JPG": image_bytes("jpg"), "B.JPEG": image_bytes("flipped"), ".DS_Store": b"\0\0\0\1Bud1"})),
         check=score_is_finite)
    case("score", "--images missing", "error", lambda c: _score(c, images=c.dir / "missing"))
    case("score", "--images is a file", "error", lambda c: _score(c, images=c.file("image.png", image_bytes("jpg"))))
    case("score", "--references empty", "error", lambda c: _score(c, references=c.folder("references", {})))
    case("score", "--images of non-images", "error", lambda c: _score(c, images=c.folder("images", {"a.txt": "x"})))
    case("score", "--dino_model missing", "error", lambda c: _score(c, "--dino_model", c.dir / "no_dino"))
    case("score", "--clip_model is a DINO model", "error", lambda c: _score(c, "--clip_model", c.ws.model("dino")))
    case("score", "--identifier with a space", "error", lambda c: _score(c, "--prompt", "a sks dog", "--identifier",
                                                                          "two words"))


def _evaluate(c: Ctx, *extra, layout: dict | None = None, out: Path | None = None) -> list:
    return evaluate_argv(c.ws, layout or own_layout(c), out or c.dir / "out", *extra)


def _evaluate_cases() -> None:
    case("evaluate", "plain cfg", "ok", lambda c: _evaluate(c))
    case("evaluate", "the old flag name --pretrained_model_path (a hidden alias)", "ok",
         lambda c: [{"--pretrained_model_name_or_path": "--pretrained_model_path"}.get(arg, arg) for arg in _evaluate(c)],
         note="issue 9 §6")
    case("evaluate", "--method ag with --weak_checkpoint_path", "ok", lambda c: _evaluate(
        c, "--method", "ag", "--weak_checkpoint_path", c.ws.lora() / "weak", layout=own_layout(c, weak=False)),
         note="issue 9 §5")
    case("evaluate", "--method ag without a weak LoRA", "error",
         lambda c: _evaluate(c, "--method", "ag", layout=own_layout(c, weak=False)), says=("weak",))
    case("evaluate", "no photo folder matches a subject", "error", lambda c: _evaluate(c, layout=own_layout(
        c, folder="robot")), says=("robot",))
    case("evaluate", "--instance_data_dir missing", "error",
         lambda c: _evaluate(c, layout={**own_layout(c), "instance": c.dir / "missing"}))
    case("evaluate", "--lora_base_dir missing", "error",
         lambda c: _evaluate(c, layout={**own_layout(c), "loras": c.dir / "missing"}))
    for flags, says in [
        (["--lambda_range", "1e400", "2"], ("lambda_range",)), (["--lambda_range", "nan", "2"], ("lambda_range",)),
        (["--lambda_range", "2", "1"], ("lambda_range",)), (["--tolerance", "nan"], ("tolerance",)),
        (["--guidance_scale", "inf"], ("guidance_scale",)), (["--max_evaluations", "1"], ("max_evaluations",)),
        (["--method", "wig", "--optimize", "omega", "--omega_grid", "0", "nan"], ("omega_grid",)),
        (["--method", "wig", "--omega", "2"], ("omega",)), (["--optimize", "omega"], ("optimize",)),
        (["--subjects", "teapot"], ("teapot",)),
    ]:
        case("evaluate", " ".join(flags), "error", lambda c, flags=flags: _evaluate(c, *flags), says=says)
    for name, content in [("not UTF-8", b"\xff\xfe{\x80"), ("malformed JSON", '{"subjects": ["dog"]'), ("empty", "")]:
        case("evaluate", f"prompts file: {name}", "error",
             lambda c, content=content: _evaluate(c, layout=own_layout(c, prompts=content)))
    _evaluate_output_cases()


def _evaluate_output_cases() -> None:
    case("evaluate", "output folder with user files, no --overwrite", "error",
         lambda c: _evaluate(c, out=c.user_files(c.dir / "out", *USER_FILES)))
    case("evaluate", "output folder with user files, --overwrite (they survive)", "ok",
         lambda c: _evaluate(c, "--overwrite", out=c.user_files(c.dir / "out", "notes.txt", "dog2/notes.txt")))
    case("evaluate", "--overwrite an earlier evaluation holding user files (they survive)", "ok",
         lambda c: _evaluate(c, "--overwrite", out=c.user_files(c.copy(c.ws.run("evaluate")), "notes.txt",
                                                                "dog2/notes.txt", "dog2/my_photo.jpg")))
    case("evaluate", "--output_dir is the reference photos' folder", "error",
         lambda c: (lambda layout: _evaluate(c, layout=layout, out=layout["instance"]))(own_layout(c)))
    case("evaluate", "--output_dir is the reference photos' folder, --overwrite (photos survive)", "either",
         lambda c: (lambda layout: _evaluate(c, "--overwrite", layout=layout, out=layout["instance"]))(own_layout(c)))
    case("evaluate", "--output_dir below a regular file", "error", lambda c: _evaluate(c, out=c.file("f", "x") / "o"))
    case("evaluate", "second run while the first holds the lock", "error", lambda c: _evaluate(
        c, "--overwrite", out=_locked(c, c.copy(c.ws.run("evaluate")), PID_ALIVE)), says=(rf"\b{PID_ALIVE}\b",))


def _tiny_cases() -> None:
    case("tiny", "a tiny sd15", "ok", lambda c: ["tiny", "sd15", c.dir / "model"])
    case("tiny", "unknown kind", "error", lambda c: ["tiny", "sd99", c.dir / "model"])
    case("tiny", "out_dir is a file", "error", lambda c: ["tiny", "sd15", c.file("model", "mine")])
    case("tiny", "out_dir holds user files", "error", lambda c: ["tiny", "sd15", c.user_files(c.dir / "m", *USER_FILES)])
    case("tiny", "out_dir below a regular file", "error", lambda c: ["tiny", "sd15", c.file("f", "x") / "model"],
         says=("is a file", "not a folder", "not a directory"))
    case("tiny", "--seed that is not a number", "error", lambda c: ["tiny", "sd15", c.dir / "model", "--seed", "x"])


for _add in (_general_cases, _train_input_cases, _train_number_cases, _train_output_cases, _resume_cases,
             _sample_cases, _score_cases, _evaluate_cases, _tiny_cases):
    _add()


# -------------------------------------------------------------------------------------------- reporting


def _short(text: str, root: Path, width: int = 150) -> str:
    text = text.replace(str(root), "$W")
    return text if len(text) <= width else text[: width - 3] + "..."


def format_row(row: Row, root: Path) -> str:
    code = "-" if row.exit_code is None else str(row.exit_code)
    lines = [f"{row.index:3d} {row.verdict:4s} exit={code:2s} expect={row.expect:6s} {row.command}: {row.name}"
             f"  [{row.seconds:.1f}s]",
             "      $ " + _short("boothkit " + " ".join(_quote(arg) for arg in row.argv), root, 1000),
             "      > " + _short(row.first_line, root)]
    if row.note:
        lines.append(f"      note: {row.note}")
    lines += [f"      ! {_short(problem, root)}" for problem in row.problems]
    lines += [f"      changed: {_short(path, root)}" for path in row.changed[:5]]
    lines += [f"      non-finite: {_short(path, root)}" for path in row.non_finite[:5]]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    return repr(arg) if (not arg or any(ch in arg for ch in " '\"\\")) else arg


def counts(rows: list[Row]) -> dict[str, int]:
    result = {category: 0 for category in CATEGORIES}
    for row in rows:
        for category in CATEGORIES:
            if any(problem.startswith(category) for problem in row.problems):
                result[category] += 1
    return {"cases": len(rows), "passed": sum(not row.problems for row in rows), **result}


def summary(rows: list[Row]) -> str:
    failing = [row for row in rows if row.problems]
    lines = ["", f"FAILING ROWS ({len(failing)} of {len(rows)}):",
             f"{'#':>3}  {'case':58s} {'expected':8s} got"]
    for row in failing:
        got = f"exit {row.exit_code if row.exit_code is not None else '- (exception)'}: {'; '.join(row.problems)}"
        lines.append(f"{row.index:3d}  {(row.command + ': ' + row.name)[:58]:58s} {row.expect:8s} {got[:160]}")
    lines.append("")
    lines.append("  ".join(f"{name}={value}" for name, value in counts(rows).items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the table as JSON to this file")
    parser.add_argument("--only", help="run only the cases whose command or description contains this")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run_cases(args.only, args.keep)
    print(summary(rows))
    print(f"{len(rows)} cases in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts(rows), "rows": [
            {**asdict(row), "verdict": row.verdict} for row in rows]}, indent=1))
    return 1 if any(row.problems for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
