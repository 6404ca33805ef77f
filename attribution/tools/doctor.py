"""``attribution doctor``: check a store, its model directories and its dataset, and say how to fix them.

What :meth:`Store.open` checks on every open is cheap (manifest, format version,
file sizes, shapes); scoring checks each row's checksum the first time it reads
it. The doctor does everything at once, reading every file in full:

  * store: the manifest and format version, array sizes, shapes and dtypes;
    every checkpoint's rows all marked done; every done row against its CRC-32
    (edited bytes, rows marked done but never written); non-finite features;
    cached kernels against their sha256; temporary files left by interrupted writes;
  * model directories: a diffusers layout with safetensors weights (pickle
    weight files are reported: they are never loaded), and each checkpoint's
    content hash against the one the store was built for;
  * data: the dataset's fingerprint and size against the store's;
  * settings: a few random rows of every checkpoint recomputed from the models
    with the manifest's settings and compared with the stored ones
    (:mod:`attribution.features.verify`): the only check that catches an edited
    or swapped manifest in a store without a settings binding. On a mismatch it
    names the one-setting edit that explains it, when one does.

Each finding names the problem and the fix; :func:`healthy` is False when any
finding is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from ..features.store import Store, StoreError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    """One result of a check: ``level``, what was found and, for problems, the fix."""

    level: Level
    what: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level}: {self.what}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


def healthy(findings: Sequence[Finding]) -> bool:
    return not any(f.level == "error" for f in findings)


def check_store(root: str | Path, chunk_rows: int = 8192) -> tuple[Store | None, list[Finding]]:
    """Full verification of the store at ``root``; returns the open store (None if it cannot be opened)."""
    root = Path(root)
    try:
        store = Store.open(root)
    except StoreError as e:
        return None, [Finding("error", str(e), "see the message; rebuilding with `attribution featurize` always works")]
    out = [Finding("ok", f"store {root}: format {store.manifest['format_version']}, {store.num_checkpoints} "
                         f"checkpoint(s), {store.num_train} rows, d = {store.proj_dim}, "
                         f"{store.config.output!r} features")]
    rerun = f"rerun `attribution featurize` with the same arguments and --store {root}"
    for m in range(store.num_checkpoints):
        try:
            done = int((np.asarray(store.done(m)) == 1).sum())
            if done < store.num_train:
                out.append(Finding("error", f"checkpoint {m}: {done} of {store.num_train} rows done (unfinished)", rerun))
            out.extend(_check_rows(store, m, chunk_rows, rerun))
        except StoreError as e:
            out.append(Finding("error", f"checkpoint {m}: {e}", rerun))
    if not store.has_checksums:
        out.append(Finding(
            "warning", "the store records no row checksums (written by an older version): edited rows go undetected",
            f"if you trust its contents, `attribution doctor --store {root} --record-checksums`",
        ))
    out.extend(_check_kernels(store))
    for tmp in sorted(root.glob(".*.tmp*")):
        out.append(Finding("warning", f"{tmp.name} was left by an interrupted write", f"delete {tmp}"))
    return store, out


def _check_rows(store: Store, m: int, chunk_rows: int, rerun: str) -> list[Finding]:
    bad = store.verify_all(m, chunk_rows)
    out = []
    if len(bad):
        out.append(Finding(
            "error",
            f"checkpoint {m}: {len(bad)} row(s) marked done fail their checksum (e.g. rows "
            f"{', '.join(str(int(i)) for i in bad[:5])}): edited, or marked done but never written",
            f"{rerun} (it recomputes them)",
        ))
    nonfinite = 0
    for s in range(0, store.num_train, chunk_rows):
        block = store._read(m, s, s + chunk_rows)
        done = np.asarray(store.done(m)[s : s + chunk_rows]) == 1
        nonfinite += int((~np.isfinite(block).all(axis=1) & done).sum())
    if nonfinite:
        out.append(Finding("error", f"checkpoint {m}: {nonfinite} done row(s) hold NaN or infinite values",
                           "featurize again into a new store (use float32 features: --half overflowed, or the model diverged)"))
    elif not len(bad):
        out.append(Finding("ok", f"checkpoint {m}: every done row " +
                           ("matches its checksum" if store.has_checksums else "is finite")))
    return out


def _check_kernels(store: Store) -> list[Finding]:
    from .files import sha256_file

    out = []
    for name, recorded in sorted(store.manifest["kernels"].items()):
        path = store.root / name
        fix = f"delete {path} and rerun `attribution featurize` (it recomputes the kernel)"
        if not path.exists():
            out.append(Finding("error", f"{name} is recorded in the manifest but missing", fix))
        elif sha256_file(path) != recorded:
            out.append(Finding("error", f"{name} does not match its recorded sha256 (edited or corrupt)", fix))
        else:
            out.append(Finding("ok", f"{name} matches its sha256"))
    if not store.manifest["kernels"]:
        out.append(Finding("ok", "no cached kernels: they are computed from the features when the store is loaded"))
    return out


def check_models(dirs: Sequence[str | Path], store: Store | None = None) -> tuple[list, list[Finding]]:
    """Load each model directory (safetensors only) and compare its hash with the store's checkpoint."""
    from ..models.base import ModelLoadError
    from ..models.load import load_model

    out: list[Finding] = []
    models = []
    recorded = store.manifest["checkpoints"] if store is not None else None
    if recorded is not None and len(dirs) != len(recorded):
        out.append(Finding("error", f"{len(dirs)} model directories given, the store was built from {len(recorded)}",
                           "pass one --model per checkpoint, in the store's order: "
                           + ", ".join(c["path"] for c in recorded)))
    for m, d in enumerate(dirs):
        d = Path(d)
        pickles = sorted(p.name for p in d.rglob("*") if p.suffix in PICKLE_SUFFIXES) if d.is_dir() else []
        if pickles:
            out.append(Finding("warning", f"{d} holds pickle weight files that are never loaded: {', '.join(pickles)}",
                               "delete them, or convert them with save_pretrained(safe_serialization=True)"))
        try:
            model = load_model(d)
        except (ModelLoadError, OSError, ValueError) as e:
            out.append(Finding("error", f"model {d}: {e}", "point --model at a diffusers directory with safetensors weights"))
            continue
        models.append(model)
        if recorded is not None and m < len(recorded):
            want = recorded[m]["hash"]
            if model.checkpoint_hash != want:
                out.append(Finding(
                    "error",
                    f"model {d} is not checkpoint {m} of the store (sha256 {model.checkpoint_hash[:12]}..., the store "
                    f"was built for {recorded[m]['path']} with {want[:12]}...)",
                    "pass the directories the store was built from, or featurize a new store for these models",
                ))
                continue
        out.append(Finding("ok", f"model {d}: safetensors weights load" +
                           (f", checkpoint {m} of the store" if recorded is not None else "")))
    return models, out


def check_data(spec: str, store: Store, models: list) -> list[Finding]:
    """Compare the dataset ``spec`` with the one the store was built from (needs the first model's shapes)."""
    from ..data.datasets import ImageDecodeError, load_dataset
    from ..features.latents import dataset_fingerprint

    if not models:
        return [Finding("error", "the data cannot be checked without a loadable model", "fix the model errors first")]
    try:
        ds = load_dataset(spec, models[0].pixel_shape)
    except (OSError, ValueError, ImageDecodeError) as e:
        return [Finding("error", f"data {spec!r}: {e}", "pass --data as 'digits', an image folder or an .npz")]
    built = store.manifest["dataset"]
    fp = dataset_fingerprint(ds, models[0])
    if fp != built["fingerprint"]:
        return [Finding(
            "error",
            f"data {spec!r} ({len(ds)} examples, fingerprint {fp[:12]}...) is not the dataset the store was built "
            f"from ({built.get('name')!r}, {built['num_train']} examples, fingerprint {built['fingerprint'][:12]}...)",
            "pass the dataset the store was built from, or featurize a new store for this one",
        )]
    return [Finding("ok", f"data {spec!r}: {len(ds)} examples, the store's fingerprint")]


def check_recomputed(store: Store, models: list, dataset, rows: int, seed: int | None = None) -> list[Finding]:
    """Recompute ``rows`` random rows of every checkpoint and compare them with the stored ones."""
    from ..features.verify import check_rows, likely_cause, mismatch_message

    fix = ("restore the store's original manifest.json, or featurize a new store "
           "(`attribution featurize` into another --store)")
    try:
        checks = check_rows(store, models, dataset, rows, seed)
    except StoreError as e:
        return [Finding("error", f"rows could not be recomputed: {e}", "fix the model and data errors first")]
    bad = [c for c in checks if not c.ok]
    if not bad:
        return [Finding("ok", f"{len(checks)} row(s) recomputed from the models match the stored ones "
                              f"(largest relative error {max((c.rel_error for c in checks), default=0.0):.1e})")]
    cause = likely_cause(store, models, dataset, max(bad, key=lambda c: c.rel_error))
    return [Finding("error", mismatch_message(store, checks, cause) or "", fix)]


def _store_dataset(spec: str, store: Store, models: list):
    """The dataset ``spec`` at the first model's pixel size, or a finding saying why it cannot be loaded."""
    from ..data.datasets import ImageDecodeError, load_dataset

    try:
        return load_dataset(spec, models[0].pixel_shape), None
    except (OSError, ValueError, ImageDecodeError) as e:
        return None, Finding("warning", f"rows not recomputed: the store's dataset {spec!r} cannot be loaded ({e})",
                             f"pass --data with the dataset the store was built from (--store {store.root})")


def run_doctor(
    store_dir: str | Path,
    model_dirs: Sequence[str | Path] | None = None,
    data: str | None = None,
    record_checksums: bool = False,
    rows: int = 3,
    bind_settings: bool = False,
) -> list[Finding]:
    """All checks: the store, the models (default: those recorded in the store), the data (default: the one
    recorded in the store, for recomputing ``rows`` rows per checkpoint; 0 skips that).

    ``bind_settings``: when every check passed and the recomputed rows match, record the manifest's
    settings as the rows' (:meth:`Store.bind_settings`), so that later edits are refused at open.
    """
    store_dir = Path(store_dir)
    if record_checksums:
        try:
            Store.open(store_dir, writable=True).record_checksums()
        except StoreError as e:
            return [Finding("error", str(e), "fix the store first")]
    store, findings = check_store(store_dir)
    if store is None:
        return findings
    dirs = list(model_dirs) if model_dirs else [store_dir / c["path"] for c in store.manifest["checkpoints"]]
    models, found = check_models(dirs, store)
    findings += found
    if data is not None:
        findings += check_data(data, store, models)
    if rows > 0 and models and healthy(findings):
        dataset, why = _store_dataset(data or store.manifest["dataset"]["name"], store, models)
        findings += [why] if why is not None else check_recomputed(store, models, dataset, rows)
    if not store.has_binding:
        verified = any(f.level == "ok" and "recomputed from the models match" in f.what for f in findings)
        findings.append(_binding_finding(store, bind_settings and verified and healthy(findings)))
    return findings


def _binding_finding(store: Store, bind: bool) -> Finding:
    """Bind a verified legacy store's settings (``bind``), or warn that its manifest is not bound."""
    if bind:
        try:
            Store.open(store.root, writable=True).bind_settings()
        except (StoreError, OSError) as e:
            return Finding("error", f"the settings could not be recorded: {e}", "check the store directory is writable")
        return Finding("ok", f"recorded the settings of the verified rows in {store.root}/built_with.json")
    return Finding(
        "warning", "the store records no settings binding (written by an older version): an edited manifest is "
                   "caught only by recomputing rows",
        f"after a healthy check, `attribution doctor --store {store.root} --bind-settings`",
    )
