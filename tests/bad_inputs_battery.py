#!/usr/bin/env python
"""Hostile-user battery: bad inputs through the real entry points, each in its own subprocess.

    python tests/bad_inputs_battery.py                 # all cases, on a fresh tiny demo copy
    python tests/bad_inputs_battery.py --only fmri     # cases whose name contains 'fmri'
    python tests/bad_inputs_battery.py --keep DIR      # build/reuse the demo copy in DIR

Every case must end with exit code 2 and exactly one message line on stderr (``error: ...``). The
pipeline's own timestamped progress log lines (``HH:MM:SS [step] ...``) are not messages and are
counted apart; any other stderr line (a traceback, a warning, an argparse usage block) counts as a
message line. A table gives each case's exit code, message lines, all stderr lines and the message;
the exit status is 0 only when every case passes.

The demo copy is the synthetic dataset with tiny models, made small (40 training images, 4 test
images, 64 px, 4 diffusion steps) and built once with ``synthetic_main.py``; each case works on its
own copy of it, so cases cannot affect each other. A tiny NSD mirror (tests/fixtures_nsd.py) serves
the NSD cases, and a local HTTP server on 127.0.0.1 the AI-caption case.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

import numpy as np

from local_http import LocalServer  # tests/ is on sys.path: this script's folder, or pytest's pythonpath

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DEMO = ROOT / "configs" / "demo.toml"
SMALL = ["--set", "synthetic.n_train=40", "--set", "synthetic.n_test=4", "--set", "synthetic.image_size=64",
         "--set", "versatile.num_inference_steps=4", "--set", "versatile.batch_size=2"]
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")
SECRET = "sk-battery-secret-0123456789"
UNSAFE_ADVICE = ("weights_only=False", "two options", "Traceback (most recent call last)")  # never shown


@dataclass
class Case:
    name: str
    what: str
    setup: Callable[[Path, "Env"], list[str]]  # (case dir, env) -> argv (after the python executable)


@dataclass
class Env:
    demo: Path  # the built demo copy (data/ results/)
    nsd: Path  # a tiny NSD mirror
    server_url: str  # failing chat-completions server

    def copy(self, case_dir: Path) -> Path:
        dst = case_dir / "demo"
        shutil.copytree(self.demo, dst)
        return dst


def synthetic(d: Path, *extra: str) -> list[str]:
    return ["synthetic_main.py", "--config", str(DEMO), "--subject", "1", "--no-progress",
            "--data-dir", str(d / "data"), "--results-dir", str(d / "results"), "--weights-dir", str(d / "weights"),
            *SMALL, *extra]


def sub_data(d: Path) -> Path:
    return d / "data" / "synthetic" / "sub1"


def run_dir(d: Path, variant: str = "base") -> Path:
    return d / "results" / "synthetic" / "sub1" / variant


# --------------------------------------------------------------------------------------------- cases


def _config_case(*sets: str):
    def setup(case: Path, env: Env) -> list[str]:
        return synthetic(env.copy(case), *[x for s in sets for x in ("--set", s)])
    return setup


def _args_case(*extra: str, copy: bool = True):
    def setup(case: Path, env: Env) -> list[str]:
        return synthetic(env.copy(case) if copy else case, *extra)
    return setup


def _results_is_file(case, env):
    d = env.copy(case)
    (case / "afile").write_text("x")
    return synthetic(d, "--results-dir", str(case / "afile"))


def _results_under_file(case, env):
    d = env.copy(case)
    (case / "afile").write_text("x")
    return synthetic(d, "--results-dir", str(case / "afile" / "results"))


def _results_not_writable(case, env):
    # running as root, permission bits do not stop writes; /proc refuses new folders for everyone
    return synthetic(env.copy(case), "--results-dir", "/proc/recon-diffuser-results", "--only", "ridge")


def _missing_config(case, env):
    return synthetic(case, "--config", str(case / "nope.toml"))


def _invalid_toml(case, env):
    (case / "bad.toml").write_text("[versatile\nstrength = 0.5\n")
    return synthetic(case, "--config", str(case / "bad.toml"))


def _short_fmri(case, env):
    d = env.copy(case)
    p = sub_data(d) / "train_fmriavg_general_sub1.npy"
    np.save(p, np.load(p)[:-3])
    return synthetic(d, "--only", "ridge", "--force")


def _nan_fmri(case, env):
    d = env.copy(case)
    p = sub_data(d) / "train_fmriavg_general_sub1.npy"
    x = np.load(p)
    x[2, 5] = np.nan
    np.save(p, x)
    return synthetic(d, "--only", "ridge", "--force")


def _pickled_npy(case, env):
    d = env.copy(case)
    p = sub_data(d) / "test_fmriavg_general_sub1.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return synthetic(d, "--only", "ridge", "--force")


def _truncated_npy(case, env):
    d = env.copy(case)
    p = sub_data(d) / "train_fmriavg_general_sub1.npy"
    p.write_bytes(p.read_bytes()[:100])
    return synthetic(d, "--only", "ridge", "--force")


def _float_indices(case, env):
    d = env.copy(case)
    vdir = run_dir(d, "myvariant") / "variant"
    vdir.mkdir(parents=True)
    np.save(vdir / "train_indices.npy", np.arange(10, dtype=np.float64))
    (vdir / "variant.json").write_text(json.dumps({"name": "myvariant", "kind": "random", "params": {}}))
    return synthetic(d, "--variant", "myvariant", "--only", "ridge")


def _corrupt_png(case, env, truncate: bool):
    d = env.copy(case)
    png = sorted((run_dir(d) / "images" / "versatile").glob("*.png"))[1]
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2] if truncate else b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return synthetic(d, "--only", "evaluate", "--force")


def _nsd_args(case: Path, raw: Path, *extra: str) -> list[str]:
    return ["nsd_main.py", "--raw-dir", str(raw), "--data-dir", str(case / "data"), "--results-dir",
            str(case / "results"), "--subject", "1", "--set", "nsd.n_sessions=2", "--only", "prepare",
            "--no-progress", *extra]


def _nsd_copy(case: Path, env: Env) -> Path:
    raw = case / "raw"
    shutil.copytree(env.nsd, raw)
    return raw


def _betas(raw: Path, n: int) -> Path:
    return next(raw.glob(f"nsddata_betas/ppdata/subj01/func1pt8mm/*/betas_session{n:02d}.nii.gz"))


def _nsd_truncated_betas(case, env):
    raw = _nsd_copy(case, env)
    p = _betas(raw, 2)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return _nsd_args(case, raw)


def _nsd_corrupt_betas(case, env):
    raw = _nsd_copy(case, env)
    _betas(raw, 1).write_bytes(b"this is not a nifti file at all" * 10)
    return _nsd_args(case, raw)


def _nsd_coco_without_image_id(case, env):
    raw = _nsd_copy(case, env)
    for p in raw.glob("nsddata_stimuli/stimuli/nsd/annotations/captions_*2017.json"):
        data = json.loads(p.read_text())
        for a in data["annotations"]:
            a.pop("image_id", None)
        p.write_text(json.dumps(data))
    return _nsd_args(case, raw)


def _nsd_sessions(case, env):
    return _nsd_args(case, env.nsd, "--set", "nsd.n_sessions=41")


def _nsd_missing_raw(case, env):
    return _nsd_args(case, case / "no-such-raw")


def _experiment(case: Path, body: str, *extra: str) -> list[str]:
    path = case / "exp_bad.toml"
    path.write_text(body)
    return ["re_recon_main.py", str(path), *extra]


EXP_HEAD = f'[experiment]\ndataset = "synthetic"\nsubjects = ["1"]\nconfigs = ["{DEMO}"]\n'


def _exp_unknown_key(case, env):
    return _experiment(case, EXP_HEAD + '[[variants]]\nmethod = "random"\nfractoin = 0.5\n', "--dry-run")


def _exp_unknown_key_run(case, env):
    return _experiment(case, EXP_HEAD + '[[variants]]\nmethod = "random"\nfractoin = 0.5\n')


def _exp_dotdot_variant(case, env):
    return _experiment(case, EXP_HEAD + '[[variants]]\nmethod = "settings"\nname = ".."\n', "--dry-run")


def _exp_bad_override(case, env):
    return _experiment(case, EXP_HEAD + '[[variants]]\nmethod = "settings"\n"versatile.strenght" = 0.5\n',
                       "--dry-run")


def _exp_bad_value(case, env):
    return _experiment(case, EXP_HEAD + '[[variants]]\nmethod = "settings"\n"versatile.mix_text" = [0.4, 1.5]\n',
                       "--dry-run")


def _exp_unknown_method(case, env):
    return _experiment(case, EXP_HEAD + '[[variants]]\nmethod = "dropall"\n', "--dry-run")


def _exp_bad_subject(case, env):
    body = EXP_HEAD.replace('subjects = ["1"]', 'subjects = ["../1"]') + '[[variants]]\nmethod = "settings"\n'
    return _experiment(case, body, "--dry-run")


def _exp_missing(case, env):
    return ["re_recon_main.py", "no_such_experiment", "--dry-run"]


def _captions_failing_server(case, env):
    d = env.copy(case)
    return ["-m", "ai_captions.generate", "--data-dir", str(d / "data"), "--dataset", "synthetic", "--subject", "1",
            "--prompt", "low_short", "--limit", "4", "--workers", "2", "--base-url", env.server_url,
            "--api-key-env", "BATTERY_KEY", "--no-progress", "--out-dir", str(case / "captions")]


def _clip_corrupt_safetensors(case, env):
    from models.clip import CLIPEmbedder

    w = case / "weights"
    CLIPEmbedder.tiny(seed=0).save_pretrained(w / "clip-vit-large-patch14")
    st = next((w / "clip-vit-large-patch14").rglob("model.safetensors"))
    st.write_bytes(st.read_bytes()[:200])
    return ["-m", "models.weights", "--weights-dir", str(w), "--check", "--only", "clip"]


def _vdvae_truncated(case, env):
    w = case / "weights" / "vdvae"
    w.mkdir(parents=True)
    import torch

    torch.save({"w": torch.zeros(64)}, w / "imagenet64-iter-1600000-model-ema.th")
    p = w / "imagenet64-iter-1600000-model-ema.th"
    p.write_bytes(p.read_bytes()[:150])
    return ["-m", "models.weights", "--weights-dir", str(case / "weights"), "--check", "--only", "vdvae"]


def _vdvae_pickled_module(case, env):
    w = case / "weights" / "vdvae"
    w.mkdir(parents=True)
    import torch

    torch.save(torch.nn.Linear(2, 2), w / "imagenet64-iter-1600000-model-ema.th")  # a module pickled whole
    return ["-m", "models.weights", "--weights-dir", str(case / "weights"), "--check", "--only", "vdvae"]


def _download_bad_subject(case, env):
    return ["-m", "prepare_data.download_nsd", "--subjects", "9", "--dest", str(case / "nsd"), "--dry-run"]


def _step_locked(case, env):
    """A second run while another holds the ridge step's lock (the holder exits by itself in 60 s)."""
    d = env.copy(case)
    lock = run_dir(d) / "ridge.lock"
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from pipeline.locks import step_lock\n"
            "with step_lock(sys.argv[1], 'step ridge for sub1/base'):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([PY, "-c", code, str(lock), str(ROOT)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    holder.stdout.readline()
    return synthetic(d, "--only", "ridge", "--force")


CASES = [
    Case("versatile_batch_size_0", "--set versatile.batch_size=0", _config_case("versatile.batch_size=0")),
    Case("synthetic_n_train_0", "--set synthetic.n_train=0", _config_case("synthetic.n_train=0")),
    Case("strength_out_of_range", "--set versatile.strength=1.5", _config_case("versatile.strength=1.5")),
    Case("mix_text_negative", "--set versatile.mix_text=-0.1", _config_case("versatile.mix_text=-0.1")),
    Case("profile_unknown", "--set evaluate.profile=foo", _config_case("evaluate.profile=foo")),
    Case("text_features_unknown", "--set versatile.text_features=maybe", _config_case("versatile.text_features=maybe")),
    Case("alpha_negative", "--set ridge.alpha_vdvae=-1", _config_case("ridge.alpha_vdvae=-1")),
    Case("device_unknown", "--set run.device=gpu0", _config_case("run.device=gpu0")),
    Case("guidance_not_a_number", "--set versatile.guidance_scale=abc", _config_case("versatile.guidance_scale=abc")),
    Case("unknown_config_key", "--set versatile.strenght=0.5", _config_case("versatile.strenght=0.5")),
    Case("variant_dotdot", "--variant ..", _args_case("--variant", "..")),
    Case("subject_traversal", "--subject ../../../outside", _args_case("--subject", "../../../outside")),
    Case("subject_slash", "--subject a/b", _args_case("--subject", "a/b")),
    Case("bad_flag_choice", "--only nonexistent", _args_case("--only", "nonexistent", copy=False)),
    Case("results_is_a_file", "--results-dir <a file>", _results_is_file),
    Case("results_under_a_file", "--results-dir <a file>/results", _results_under_file),
    Case("results_not_writable", "--results-dir /proc/... (not writable)", _results_not_writable),
    Case("config_missing", "--config nope.toml", _missing_config),
    Case("config_invalid_toml", "--config bad.toml (syntax error)", _invalid_toml),
    Case("fmri_short", "train fMRI 3 rows short, ridge", _short_fmri),
    Case("fmri_nan", "NaN in the train fMRI, ridge", _nan_fmri),
    Case("npy_pickled", "object array in test fMRI, ridge", _pickled_npy),
    Case("npy_truncated", "truncated train fMRI .npy, ridge", _truncated_npy),
    Case("train_indices_float", "float train_indices.npy, ridge", _float_indices),
    Case("png_corrupt", "garbage reconstruction PNG, evaluate", lambda c, e: _corrupt_png(c, e, False)),
    Case("png_truncated", "truncated reconstruction PNG, evaluate", lambda c, e: _corrupt_png(c, e, True)),
    Case("nsd_betas_truncated", "truncated betas .nii.gz, NSD prepare", _nsd_truncated_betas),
    Case("nsd_betas_corrupt", "garbage betas .nii.gz, NSD prepare", _nsd_corrupt_betas),
    Case("nsd_coco_no_image_id", "COCO annotations without image_id", _nsd_coco_without_image_id),
    Case("nsd_sessions_41", "--set nsd.n_sessions=41", _nsd_sessions),
    Case("nsd_raw_missing", "--raw-dir that does not exist", _nsd_missing_raw),
    Case("exp_unknown_key_dry_run", "experiment variant key 'fractoin', --dry-run", _exp_unknown_key),
    Case("exp_unknown_key_run", "experiment variant key 'fractoin', run", _exp_unknown_key_run),
    Case("exp_variant_dotdot", "experiment variant name '..'", _exp_dotdot_variant),
    Case("exp_bad_override_key", "experiment override versatile.strenght", _exp_bad_override),
    Case("exp_bad_override_value", "experiment override versatile.mix_text=1.5", _exp_bad_value),
    Case("exp_unknown_method", "experiment variant method 'dropall'", _exp_unknown_method),
    Case("exp_subject_traversal", "experiment subject '../1'", _exp_bad_subject),
    Case("exp_missing", "experiment name not found", _exp_missing),
    Case("captions_server_400", "AI captions, server answers HTTP 400", _captions_failing_server),
    Case("clip_safetensors_corrupt", "truncated CLIP model.safetensors, weights --check", _clip_corrupt_safetensors),
    Case("vdvae_checkpoint_truncated", "truncated VDVAE .th, weights --check", _vdvae_truncated),
    Case("vdvae_checkpoint_pickled_module", "VDVAE .th pickling a whole module, weights --check",
         _vdvae_pickled_module),
    Case("download_nsd_subject_9", "download_nsd --subjects 9", _download_bad_subject),
    Case("step_locked", "a second run while another holds the ridge step's lock", _step_locked),
]


# ------------------------------------------------------------------------------------------ fixtures


def build_demo(dest: Path) -> None:
    if (run_dir(dest) / "evaluate.done.json").is_file():
        return
    t = time.time()
    res = subprocess.run([PY, *synthetic(dest)], cwd=ROOT, capture_output=True, text=True, env=child_env())
    if res.returncode != 0:
        sys.exit(f"building the demo copy failed:\n{res.stderr[-3000:]}")
    print(f"demo copy built in {time.time() - t:.0f} s: {dest}", file=sys.stderr)


def build_nsd(dest: Path) -> None:
    if dest.is_dir():
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_nsd import make_nsd_fixture

    make_nsd_fixture(dest, subjects=(1,), n_sessions=2, trials_per_session=8, n_images=10, n_shared=3)


class FailingServer(LocalServer):
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers every request with HTTP 400 and echoes
    the caller's Authorization header (so a leaked key would show); counts requests."""

    def __init__(self):
        self.n = 0
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                srv.n += 1
                body = json.dumps({"error": {"message": f"Invalid image (auth {self.headers.get('Authorization')})",
                                             "type": "invalid_request_error"}}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(H, "/v1")


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               BATTERY_KEY=SECRET, NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    env.pop("PYTHONWARNINGS", None)
    return env


# ----------------------------------------------------------------------------------------------- run


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_case(case: Case, work: Path, env: Env, timeout: float = 300) -> dict:
    d = work / case.name
    d.mkdir(parents=True)
    argv = case.setup(d, env)
    t = time.time()
    try:
        res = subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=child_env())
        rc, err, out = res.returncode, res.stderr, res.stdout
    except subprocess.TimeoutExpired as exc:
        rc, err, out = "timeout", _text(exc.stderr), _text(exc.stdout)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    messages = [ln for ln in lines if not LOG_LINE.match(ln)]
    leaked = SECRET in err + out or any(a in err + out for a in UNSAFE_ADVICE)
    ok = rc == 2 and len(messages) == 1 and messages[0].startswith("error: ") and not leaked
    return {"case": case.name, "what": case.what, "rc": rc, "message_lines": len(messages),
            "stderr_lines": len(lines), "seconds": round(time.time() - t, 1), "ok": ok,
            "message": messages[0] if messages else ""}


def run_battery(only: list[str] | None = None, keep: Path | None = None, out=sys.stdout) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="recon-battery-"))
    base = keep or tmp
    base.mkdir(parents=True, exist_ok=True)
    build_demo(base / "demo")
    build_nsd(base / "nsd")
    server = FailingServer()
    env = Env(demo=base / "demo", nsd=base / "nsd", server_url=server.url)
    cases = [c for c in CASES if not only or any(o in c.name for o in only)]
    rows = []
    try:
        work = tmp / "cases"
        for case in cases:
            row = run_case(case, work, env)
            rows.append(row)
            print(f"{'ok ' if row['ok'] else 'BAD'} {row['case']:<28} rc={row['rc']} lines={row['message_lines']}"
                  f"/{row['stderr_lines']} {row['seconds']:>5.1f}s  {row['message'][:150]}", file=out, flush=True)
    finally:
        server.close()
        shutil.rmtree(tmp / "cases", ignore_errors=True)
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    n_ok = sum(r["ok"] for r in rows)
    print(f"{n_ok}/{len(rows)} bad inputs ended with exit code 2 and one message line "
          f"(caption server saw {server.n} requests)", file=out)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=None, help="run the cases whose name contains one of these")
    p.add_argument("--keep", type=Path, default=None, help="build (or reuse) the demo copy and NSD mirror here")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = p.parse_args(argv)
    rows = run_battery(args.only, args.keep)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
