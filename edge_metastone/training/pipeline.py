"""`train-sprm` end to end: collect (resumable) -> split by problem -> train the head -> fit the
combined selector on the validation problems -> report -> write.

The input model file is only read. The head goes into a copy of the model (metadata, SPEC §2) or,
when the output name ends in `.sprm.gguf`, into a sidecar head file, with the fitted selector
(`metastone.selector`) and the best measured strategy (`metastone.default_strategy`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edge_metastone import keys
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.modelfile.copy import provenance, write_model_copy
from edge_metastone.modelfile.head import write_head_sidecar
from edge_metastone.modelfile.read import SIDECAR_SUFFIX, open_model_file
from edge_metastone.runtime import model_kind, open_backend
from edge_metastone.sprm import SprmHead, StepRule
from edge_metastone.training.collect import (
    CollectSettings,
    Problem,
    ProblemData,
    SampleCache,
    collect,
    identity,
    read_problems,
)
from edge_metastone.training.loss import Loss
from edge_metastone.training.selector_fit import fit_selector
from edge_metastone.training.train import (
    TrainLog,
    TrainSettings,
    report,
    samples_for,
    split,
    train_head,
    training_steps,
)

logger = logging.getLogger(__name__)


def default_cache(out_path: Path) -> Path:
    """Where samples are cached unless told: beside the output, `OUT.samples/`."""
    return out_path.with_name(out_path.name + ".samples")


def train_sprm(
    model_path: Path | str,
    data_path: Path | str,
    out_path: Path | str,
    *,
    collect_settings: CollectSettings,
    train_settings: TrainSettings,
    warm_start: bool = False,
    head_path: Path | str | None = None,
    cache_dir: Path | str | None = None,
    n_threads: int = 0,
    n_gpu_layers: int = 0,
    weight_buffers: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect, train, report and write; returns the report (also written as OUT.report.json)."""
    model_path, out_path = Path(model_path), Path(out_path)
    _check_paths(model_path, out_path, head_path)
    problems = read_problems(data_path)
    mf = open_model_file(model_path, head_path)
    init: SprmHead | None = mf.head if warm_start else None
    if warm_start and train_settings.form != "mlp":
        raise EdgeMetastoneError("--warm-start applies to the mlp form (a linear head is fitted)")
    if warm_start and init is None:
        raise EdgeMetastoneError(f"{model_path} has no SPRM head to warm-start from")
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache(out_path)
    gold = {p.key: p.answer for p in problems}
    data, rule, feature_layer = _collect_samples(
        model_path,
        head_path,
        mf.path,
        problems,
        collect_settings,
        cache_root,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        weight_buffers=weight_buffers,
        progress=progress,
    )
    head, trained = _train(data, gold, train_settings, feature_layer, init, warm_start)
    result: dict[str, Any] = {
        "model": str(model_path),
        "output": str(out_path),
        "collect": asdict(collect_settings),
        **trained,
    }
    head_facts = _head_facts(Path(data_path), len(data), collect_settings, train_settings, trained)
    recorded = {
        keys.SELECTOR: json.dumps(trained["selector"], sort_keys=True),
        keys.DEFAULT_STRATEGY: trained["default_strategy"],
    }
    _write_head(model_path, out_path, head, rule, mf.arch, head_facts, recorded)
    report_path = out_path.with_name(out_path.name + ".report.json")
    report_path.write_text(json.dumps(result, indent=2) + "\n")
    result["report_file"] = str(report_path)
    return result


def _check_paths(model_path: Path, out_path: Path, head_path: Path | str | None) -> None:
    """The output is no input, and the model is a GGUF file (a head is written into GGUF)."""
    if out_path.resolve() == model_path.resolve() or (
        head_path is not None and out_path.resolve() == Path(head_path).resolve()
    ):
        raise EdgeMetastoneError(f"{out_path}: the output must not be an input file")
    if model_kind(model_path) != "gguf":
        raise EdgeMetastoneError(
            f"{model_path}: train-sprm needs a GGUF model (it writes a GGUF copy or a sidecar "
            "head); convert the checkpoint with `edge-metastone convert HF_DIR -o FILE.gguf`"
        )


def _collect_samples(
    model_path: Path,
    head_path: Path | str | None,
    identity_path: Path,
    problems: list[Problem],
    collect_settings: CollectSettings,
    cache_root: Path,
    *,
    n_threads: int,
    n_gpu_layers: int,
    weight_buffers: str | None,
    progress: bool,
) -> tuple[list[ProblemData], StepRule, int]:
    """Sample and label the problems (resuming from the cache); returns the samples, the model's
    step rule and the layer the head reads."""
    backend = open_backend(
        model_path,
        head=head_path,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        weight_buffers=weight_buffers,
    )
    try:
        cache_id = identity(identity_path, collect_settings, backend.feature_layer)
        cache = SampleCache(cache_root, cache_id)
        rule, feature_layer = backend.rule, backend.feature_layer
        if not rule.step_token_ids:
            raise EdgeMetastoneError(f"{model_path}: cannot find the step delimiter's token ids")
        data = _collect_with_progress(backend, problems, collect_settings, cache, progress)
    finally:
        backend.close()
    return data, rule, feature_layer


def _train(
    data: list[ProblemData],
    gold: dict[str, str],
    train_settings: TrainSettings,
    feature_layer: int,
    init: SprmHead | None,
    warm_start: bool,
) -> tuple[SprmHead, dict[str, Any]]:
    """Split by answer value (train.split), train the head, and report on the validation
    problems (on the training ones when none are held out; against the warm start's head too)."""
    train_keys, val_keys, how = split(
        [(d.key, gold[d.key]) for d in data], train_settings.val_split, train_settings.seed
    )
    train_data = [d for d in data if d.key in train_keys]
    val_data = [d for d in data if d.key in val_keys] or train_data
    x, y = training_steps(train_data)
    settings, head, log, forms = _fit_forms(x, y, val_data, train_settings, feature_layer, init)
    trained: dict[str, Any] = {
        "train": {
            **_train_facts(settings, warm_start),
            "problems": len(train_data),
            "steps": len(y),
            "positive_steps": int(y.sum()),
            "final_loss": log.losses[-1],
            "sign_filter_kept": log.kept_fraction[-1],
        },
        "validation_is_training_set": not val_keys,
        "validation_split": how,
        "validation": forms[settings.form],
    }
    if train_settings.form == "auto":  # every form's validation, and which was kept
        trained["forms"] = {"chosen": settings.form, **forms}
    selector, best = fit_selector(
        samples_for(val_data, head), seed=train_settings.seed, in_sample=not val_keys
    )
    trained["selector"] = json.loads(selector.to_json())
    trained["default_strategy"] = best.value
    if init is not None:
        trained["validation_before"] = report(val_data, init)
    return head, trained


def _fit_forms(
    x: np.ndarray,
    y: np.ndarray,
    val_data: list[ProblemData],
    train_settings: TrainSettings,
    feature_layer: int,
    init: SprmHead | None,
) -> tuple[TrainSettings, SprmHead, TrainLog, dict[str, dict[str, Any]]]:
    """Train the head in its form, or for `auto` in each form (the MLP with the chosen loss, the
    linear one with BCE), keeping the higher within-problem AUC on the validation problems (ties:
    the MLP, the paper's). Returns the kept form's settings, head and log, and each form's
    validation report."""
    forms = ("mlp", "linear") if train_settings.form == "auto" else (train_settings.form,)
    fits, reports = {}, {}
    for form in forms:
        loss = Loss.BCE if form == "linear" else train_settings.loss
        settings = dataclasses.replace(train_settings, form=form, loss=loss)
        fits[form] = (
            settings,
            *train_head(
                x, y, settings, feature_layer=feature_layer, init=init if form == "mlp" else None
            ),
        )
        reports[form] = report(val_data, fits[form][1])
    best = max(forms, key=lambda f: (reports[f]["trajectory_auc_within"] or 0.0, f == "mlp"))
    return (*fits[best], reports)


def _train_facts(train_settings: TrainSettings, warm_start: bool) -> dict[str, Any]:
    """The training settings as the report gives them (enums by value)."""
    settings = {
        k: (v.value if hasattr(v, "value") else v) for k, v in asdict(train_settings).items()
    }
    return {**settings, "warm_start": warm_start}


def _head_facts(
    data_path: Path,
    n_problems: int,
    collect_settings: CollectSettings,
    train_settings: TrainSettings,
    trained: dict[str, Any],
) -> dict[str, Any]:
    """How the head was trained and what its validation measured (the fronts read the latter to
    label the head, modelfile.about), for the output's provenance."""
    v = trained["validation"]
    return {
        "validation": {
            "split": trained["validation_split"],
            "problems": v["problems"],
            "trajectory_auc_within": v["trajectory_auc_within"],
            "logprob_auc_within": v["logprob_auc_within"],
        },
        "trained_with": trained["train"]["loss"],
        "form": trained["train"]["form"],
        "script": "edge-metastone train-sprm",
        "data": data_path.name,
        "problems": n_problems,
        "samples": collect_settings.samples,
        "temperature": collect_settings.temperature,
        "seed": train_settings.seed,
        "epochs": train_settings.epochs,
        "date": datetime.date.today().isoformat(),
    }


def _write_head(
    model_path: Path,
    out_path: Path,
    head: SprmHead,
    rule: StepRule,
    arch: str,
    head_facts: dict[str, Any],
    recorded: dict[str, str],
) -> None:
    """The head into a sidecar file (`*.sprm.gguf`) or into a copy of the model, with the
    `recorded` string keys (the selector and the default strategy)."""
    prov = provenance(model_path)
    prov["sprm"] = head_facts
    extra = {
        keys.SPRM_TRAINED_WITH: head_facts["trained_with"],
        keys.PROVENANCE: json.dumps(prov, sort_keys=True),
        **recorded,
    }
    if out_path.name.endswith(SIDECAR_SUFFIX):
        write_head_sidecar(out_path, head, rule, arch=arch, extra=extra)
    else:
        write_model_copy(model_path, out_path, head=head, rule=rule, extra=extra)


def _collect_with_progress(engine, problems, settings, cache, progress: bool) -> list:
    from tqdm import tqdm

    data = []
    right = total = 0
    bar = tqdm(total=len(problems), unit="problem", disable=not progress, desc="sampling")
    with bar:
        for _p, d, fresh in collect(engine, problems, settings, cache):
            data.append(d)
            right += int(d.correct.sum())
            total += len(d.correct)
            bar.set_postfix(acc=f"{right / total:.3f}", refresh=False)
            bar.update(1)
            if not fresh:
                bar.set_description("sampling (resumed)", refresh=False)
    return data
