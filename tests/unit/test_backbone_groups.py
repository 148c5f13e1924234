"""One backbone per fine-tuned task run: pairing checks, backbone groups, register handling, and a
gateway that asks Triton only for the groups a request needs."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from api.inference.batching import MicroBatcher
from api.inference.lanes import DEFAULT_LANE, Lane
from api.inference.service import outputs_for, result_from
from export import cli, repository
from export.checkpoint import load_backbone_checkpoint, save_finetuned
from export.heads import AttentiveHead, LinearHead
from export.model import FMHCTViT, ViTConfig
from export.serving_graph import ServingGraph
from export.tasks import ExportError, TaskSpec
from headct import contract
from headct.model_card import ModelCard
from tests.unit.test_onnx_export import TINY
from tests.unit.test_repository import _Request, load_python_model

BIASED = ViTConfig(**{**TINY.to_dict(), "qkv_bias": True})


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                fresh = torch.randn(value.shape, generator=generator) * 0.2
                value.copy_(fresh.abs() + 0.5 if name.endswith("running_var") else fresh)
    return module.eval()


def _run(d: Path, task: str, seed: int, *, epoch: int, backbone: FMHCTViT | None = None) -> None:
    """One official downstream run: vit_<task>.pt + <task>_classifier.pt saved in the same step."""
    backbone = backbone if backbone is not None else _randomise(FMHCTViT(BIASED), seed)
    head = LinearHead(TINY.embed_dim) if seed % 2 else AttentiveHead(TINY.embed_dim, TINY.num_heads)
    _randomise(head, seed + 100)
    save_finetuned(
        backbone, head, d / f"vit_{task}.pt", d / f"{task}_classifier.pt", epoch=epoch, best_metric=0.8
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("runs")
    pretrained = _randomise(FMHCTViT(BIASED), 0)
    torch.save(pretrained.state_dict(), d / "pretrained.pt")
    _run(d, "ich", 1, epoch=7)
    _run(d, "sdh", 2, epoch=9)
    _run(d, "edema", 3, epoch=4, backbone=pretrained)  # a truly frozen (--lock) linear-probe run
    return d


def _export(d: Path, repo: Path, *extra: str) -> int:
    return cli.main(
        [
            "--num-heads", str(TINY.num_heads),
            "--target", "cpu",
            "--repository", str(repo),
            "--max-batch-size", "4",
            *extra,
        ]
    )  # fmt: skip


def _task(d: Path, name: str, backbone: str | None = None, threshold: float = 0.5) -> list[str]:
    return [
        "--task",
        f"{name}={d / (backbone or f'vit_{name}.pt')},{d / f'{name}_classifier.pt'}:{threshold}",
    ]


# ------------------------------------------------------------------------------------------- pairing


def test_task_spec_parses_backbone_head_and_threshold() -> None:
    spec = TaskSpec.parse("ich=/ckpt/vit_ich.pt,/ckpt/ich_classifier.pt:0.4")
    assert (spec.name, spec.backbone, spec.head, spec.threshold) == (
        "ich",
        Path("/ckpt/vit_ich.pt"),
        Path("/ckpt/ich_classifier.pt"),
        0.4,
    )
    with pytest.raises(ExportError, match="NAME=BACKBONE,HEAD"):
        TaskSpec.parse("ich=/ckpt/ich_classifier.pt")


def test_a_head_on_another_runs_backbone_is_refused_naming_both_files(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _export(runs, tmp_path, "--task", f"ich={runs / 'vit_sdh.pt'},{runs / 'ich_classifier.pt'}")
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED and "PairingError" in err and "different training runs" in err
    assert "vit_sdh.pt (epoch 9" in err and "ich_classifier.pt (epoch 7" in err
    assert not (tmp_path / "fmhct").exists()


def test_a_head_on_a_bias_less_pretrained_backbone_is_refused(
    tmp_path: Path, runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(_randomise(FMHCTViT(TINY), 5).state_dict(), tmp_path / "model_weights.pth")
    code = _export(runs, tmp_path / "repo", "--backbone", str(tmp_path / "model_weights.pth"), "--head",
                   f"ich={runs / 'ich_classifier.pt'}")  # fmt: skip
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED and "has no qkv bias" in err and "vit_<task>.pt" in err


def test_unverifiable_pairing_is_refused_unless_allowed_and_then_recorded(
    tmp_path: Path, runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = _randomise(LinearHead(TINY.embed_dim), 1)
    torch.save(head.state_dict(), tmp_path / "bare_classifier.pt")  # no run metadata
    argv = ["--backbone", str(runs / "pretrained.pt"), "--head", f"x={tmp_path / 'bare_classifier.pt'}:0.5"]
    assert _export(runs, tmp_path / "repo", *argv) == cli.EXIT_FAILED
    assert "cannot verify" in capsys.readouterr().err
    assert _export(runs, tmp_path / "repo", *argv, "--allow-unpaired") == cli.EXIT_OK
    card = repository.read_model_card(tmp_path / "repo" / "fmhct")
    assert card is not None and card.unpaired_allowed
    assert card.tasks[0].pairing == "override" and "cannot verify" in card.tasks[0].pairing_detail


# ------------------------------------------------------------------------------- groups, end to end


@pytest.fixture(scope="module")
def grouped(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("grouped")
    argv = ["--backbone", str(runs / "pretrained.pt"), *_task(runs, "ich", threshold=0.4),
            *_task(runs, "sdh", threshold=0.3), *_task(runs, "edema")]  # fmt: skip
    assert _export(runs, repo, *argv) == cli.EXIT_OK
    return repo


def test_tasks_are_grouped_by_backbone_weights(grouped: Path, runs: Path) -> None:
    card = repository.read_model_card(grouped / "fmhct")
    assert card is not None
    # The frozen probe's vit_edema.pt holds the pretrained weights: one group, one forward for both.
    assert [(g.name, g.tasks, g.checkpoints) for g in card.groups] == [
        ("pretrained", ["edema"], ["pretrained.pt", "vit_edema.pt"]),
        ("vit_ich", ["ich"], ["vit_ich.pt"]),
        ("vit_sdh", ["sdh"], ["vit_sdh.pt"]),
    ]
    assert card.embedding_group == "pretrained"
    assert [(t.name, t.group, t.pairing, t.threshold) for t in card.tasks] == [
        ("ich", "vit_ich", "verified", 0.4),
        ("sdh", "vit_sdh", "verified", 0.3),
        ("edema", "pretrained", "verified", 0.5),
    ]
    config = repository.read_config(grouped / "fmhct" / "config.pbtxt")
    grid = [TINY.grid_size] * 3
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("probabilities__pretrained", [1]),
        ("embedding__pretrained", [TINY.embed_dim]),
        ("attention__pretrained", [1, *grid]),
        ("probabilities__vit_ich", [1]),
        ("embedding__vit_ich", [TINY.embed_dim]),
        ("attention__vit_ich", [1, *grid]),
        ("probabilities__vit_sdh", [1]),
        ("embedding__vit_sdh", [TINY.embed_dim]),
        ("attention__vit_sdh", [1, *grid]),
    ]
    assert [g.attention_output for g in card.groups] == [
        "attention__pretrained",
        "attention__vit_ich",
        "attention__vit_sdh",
    ]
    methods = {"linear": contract.ATTENTION_CLS_LAST_BLOCK, "attentive": contract.ATTENTION_HEAD_QUERY}
    assert all(t.attention_method == methods[t.head_type] for t in card.tasks)
    assert (grouped / "fmhct" / "labels__vit_sdh.txt").read_text() == "sdh\n"


def _official(runs: Path, task: str, image: torch.Tensor) -> float:
    """What the authors' downstream code computes: that run's backbone, that run's head, softmax[:, 1]."""
    loaded = load_backbone_checkpoint(runs / f"vit_{task}.pt", num_heads=TINY.num_heads)
    state = torch.load(runs / f"{task}_classifier.pt", weights_only=False)["state_dict"]
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    head = (
        AttentiveHead(TINY.embed_dim, TINY.num_heads) if "wkv.weight" in state else LinearHead(TINY.embed_dim)
    )
    head.load_state_dict(state)
    with torch.no_grad():
        tokens = loaded.model.forward_features(image.float())
        return float(torch.softmax(head.eval()(tokens), dim=-1)[0, 1])


@pytest.fixture
def python_model(grouped: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_python_model(grouped / "fmhct", 1, monkeypatch)


class _AskingRequest(_Request):
    def __init__(self, outputs: Sequence[str], **inputs: np.ndarray) -> None:
        super().__init__(**inputs)
        self.outputs = list(outputs)

    def requested_output_names(self) -> list[str]:
        return self.outputs


def test_served_probabilities_equal_each_runs_own_model_and_only_needed_groups_run(
    python_model: Any, runs: Path
) -> None:
    # one backbone group each, with a session without and one with the optional attention map
    assert len(python_model.sessions) == 3
    calls: list[list[str]] = []
    for group in python_model.sessions:
        for attribute in ("base", "full"):
            original = getattr(group, attribute).run

            def counting(names: Any, feeds: Any, _original: Any = original) -> Any:
                calls.append(list(names))
                return _original(names, feeds)

            setattr(group, attribute, type("S", (), {"run": staticmethod(counting)})())
    image = torch.rand((1, *contract.INPUT_SHAPE), generator=torch.Generator().manual_seed(3)).half()
    (response,) = python_model.execute([_AskingRequest(["probabilities__vit_ich"], image=image.numpy())])
    assert response.error is None and list(response.outputs) == ["probabilities__vit_ich"]
    assert calls == [["probabilities__vit_ich", "embedding__vit_ich"]]  # the other backbones never ran
    calls.clear()
    asked = ["probabilities__vit_ich", "attention__vit_ich"]
    (explained,) = python_model.execute([_AskingRequest(asked, image=image.numpy())])
    assert calls == [["probabilities__vit_ich", "embedding__vit_ich", "attention__vit_ich"]]
    assert explained.error is None and list(explained.outputs) == asked
    assert (
        explained.outputs["probabilities__vit_ich"][0, 0] == response.outputs["probabilities__vit_ich"][0, 0]
    )
    maps = explained.outputs["attention__vit_ich"]
    assert maps.shape == (1, 1, *[TINY.grid_size] * 3) and maps.sum() == pytest.approx(1.0, abs=1e-5)
    assert float(response.outputs["probabilities__vit_ich"][0, 0]) == pytest.approx(
        _official(runs, "ich", image), abs=1e-4
    )
    (everything,) = python_model.execute([_Request(image=image.numpy())])
    assert float(everything.outputs["probabilities__vit_sdh"][0, 0]) == pytest.approx(
        _official(runs, "sdh", image), abs=1e-4
    )


# ---------------------------------------------------------------------------------------- registers


@pytest.mark.slow
def test_registers_are_dropped_by_default_as_the_downstream_configs_do(tmp_path: Path) -> None:
    """Full-size DINO training dict (4 registers, qkv bias, official `module.backbone.` keys)."""
    variant = ViTConfig(qkv_bias=True, num_register_tokens=4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FMHCTViT(variant).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {f"module.backbone.{k}": torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    torch.save({"epoch": 99, "best_loss": 1.5, "state_dict": state, "momentum_model_state_dict": None},
               tmp_path / "dino.pth")  # fmt: skip
    dropped = load_backbone_checkpoint(tmp_path / "dino.pth", registers="drop")
    kept = load_backbone_checkpoint(tmp_path / "dino.pth", registers="keep")
    assert dropped.registers == "dropped" and dropped.config.num_register_tokens == 0
    assert dropped.config.num_tokens == 513 and kept.config.num_tokens == 517 and kept.registers == "kept"
    assert dropped.config.qkv_bias and dropped.run is not None and dropped.run.epoch == 99
    image = torch.rand((1, *contract.INPUT_SHAPE), generator=generator)
    with torch.no_grad():
        cls_dropped = dropped.model.forward_features(image)[:, 0]
        cls_kept = kept.model.forward_features(image)[:, 0]
    assert not torch.allclose(cls_dropped, cls_kept, atol=1e-4)  # the choice changes the answer
    assert dropped.weights_sha256 != kept.weights_sha256


# ------------------------------------------------------------------------------------------- gateway


def _grouped_card(grouped: Path) -> ModelCard:
    card = repository.read_model_card(grouped / "fmhct")
    assert card is not None
    return card


def test_the_gateway_asks_only_for_the_groups_of_the_requested_tasks(grouped: Path) -> None:
    card = _grouped_card(grouped)
    assert outputs_for(card, ["sdh"], False) == ["probabilities__vit_sdh"]
    assert outputs_for(card, ["sdh"], True) == ["probabilities__vit_sdh", "embedding__pretrained"]
    assert outputs_for(card, [], False) == [
        "probabilities__pretrained",
        "probabilities__vit_ich",
        "probabilities__vit_sdh",
    ]
    rows = {"probabilities__vit_sdh": np.array([0.25], np.float32), "embedding__pretrained": np.ones(24)}
    result = result_from(card, rows)
    assert result.probabilities == {"sdh": 0.25} and result.embedding is not None


def test_the_batcher_asks_for_the_union_and_answers_each_scan_its_own_outputs() -> None:
    asked: list[list[str]] = []

    async def infer(
        batch: np.ndarray, timeout_s: float, outputs: Sequence[str], *, lane: Lane = DEFAULT_LANE
    ) -> dict[str, np.ndarray]:
        asked.append(list(outputs))
        return {name: np.full((len(batch), 1), i, np.float32) for i, name in enumerate(outputs)}

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = MicroBatcher(infer, max_size=8, max_delay_s=0.05)
        deadline = asyncio.get_running_loop().time() + 10
        image = np.zeros((2, 2), np.float16)
        return await asyncio.gather(
            batcher.submit(image, deadline, ["probabilities__a"]),
            batcher.submit(image, deadline, ["probabilities__b", "embedding__a"]),
        )

    first, second = asyncio.run(main())
    assert asked == [["embedding__a", "probabilities__a", "probabilities__b"]]
    assert list(first) == ["probabilities__a"] and list(second) == ["probabilities__b", "embedding__a"]


def test_a_one_group_graph_keeps_the_plain_contract_names() -> None:
    graph = ServingGraph(FMHCTViT(TINY), {"a": LinearHead(TINY.embed_dim)})
    assert graph.output_names == (
        contract.PROBABILITIES_NAME,
        contract.EMBEDDING_NAME,
        contract.ATTENTION_NAME,
    )


def test_an_answer_from_another_model_version_is_refused_not_mislabelled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import api.inference.service
    from api.inference.batching import BatchAnswer
    from api.problems import ProblemError
    from tests.unit.test_inference_path import FakeModel, fake_prepare, service_for

    class UpdatedMidway(FakeModel):
        """Triton answers from version 2 while the gateway's card still describes version 1."""

        def __init__(self) -> None:
            super().__init__()
            self.invalidated: list[str] = []

        async def infer_batch(
            self, batch: Any, timeout_s: float, outputs: Sequence[str] = (), *, lane: Lane = DEFAULT_LANE
        ) -> BatchAnswer:
            answer = await super().infer_batch(batch, timeout_s, outputs, lane=lane)
            return BatchAnswer(answer, model_version="2")

        def invalidate_card(self, reason: str) -> None:
            self.invalidated.append(reason)

    monkeypatch.setattr(api.inference.service, "prepare_scan", fake_prepare)
    model = UpdatedMidway()
    service = service_for(model)

    async def main() -> None:
        await service.start()
        try:
            await service.predict(tmp_path / "scan", "application/octet-stream")
        finally:
            await service.close()

    with pytest.raises(ProblemError) as raised:
        asyncio.run(main())
    assert (raised.value.status, raised.value.code) == (503, "model_card_stale")
    assert "Retry-After" in raised.value.headers and model.invalidated


@pytest.mark.slow
def test_pairing_and_grouping_at_full_size_with_the_official_layouts(tmp_path: Path) -> None:
    """ViT-B files as the authors' code writes them: the released bare state_dict (no qkv bias), and
    downstream runs (`_orig_mod.` keys, qkv bias, no registers, epoch/best_loss in both files)."""
    from export.checkpoint import load_head_checkpoint
    from export.tasks import PairingError, check_pairing, group_backbones

    downstream = ViTConfig(qkv_bias=True)
    with torch.device("meta"):
        released_shapes = {k: v.shape for k, v in FMHCTViT(ViTConfig()).state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    released = {k: torch.randn(s, generator=generator) * 0.02 for k, s in released_shapes.items()}
    torch.save(released, tmp_path / "model_weights.pth")
    finetuned = FMHCTViT(downstream)
    finetuned.load_state_dict(
        {**released, **{k: v for k, v in finetuned.state_dict().items() if "qkv.bias" in k}}
    )
    head = _randomise(LinearHead(768), 2)
    save_finetuned(
        finetuned, head, tmp_path / "vit_ich.pt", tmp_path / "ich_classifier.pt", epoch=11, best_metric=0.9
    )
    # A second, truly frozen run (--lock): same backbone tensors, its own file and metadata.
    save_finetuned(
        finetuned, head, tmp_path / "vit_sdh.pt", tmp_path / "sdh_classifier.pt", epoch=3, best_metric=0.7
    )

    pretrained = load_backbone_checkpoint(tmp_path / "model_weights.pth")
    ich = load_backbone_checkpoint(tmp_path / "vit_ich.pt")
    sdh = load_backbone_checkpoint(tmp_path / "vit_sdh.pt")
    assert sum(p.numel() for p in pretrained.model.parameters()) == 89_404_416
    assert ich.config == downstream and ich.run is not None and ich.run.epoch == 11
    ich_head = load_head_checkpoint(tmp_path / "ich_classifier.pt", 768)
    sdh_head = load_head_checkpoint(tmp_path / "sdh_classifier.pt", 768)

    assert check_pairing("ich", ich, ich_head, allow_unpaired=False).status == "verified"
    with pytest.raises(PairingError, match="has no qkv bias"):
        check_pairing("ich", pretrained, ich_head, allow_unpaired=False)
    with pytest.raises(PairingError, match="different training runs"):
        check_pairing("ich", sdh, ich_head, allow_unpaired=False)
    assert check_pairing("sdh", sdh, sdh_head, allow_unpaired=False).status == "verified"

    groups = group_backbones([(None, pretrained), ("ich", ich), ("sdh", sdh)])
    # Equal tensors in two runs' files: one group, one forward; the bias-less pretrained is its own.
    assert [(g.name, g.tasks, [c.path.name for c in g.checkpoints]) for g in groups] == [
        ("model_weights", [], ["model_weights.pth"]),
        ("vit_ich", ["ich", "sdh"], ["vit_ich.pt", "vit_sdh.pt"]),
    ]
    assert groups[0].probabilities_output is None and groups[0].embedding_output == "embedding__model_weights"


def test_a_pretrained_backbone_without_tasks_serves_the_embedding(runs: Path, tmp_path: Path) -> None:
    argv = ["--backbone", str(runs / "pretrained.pt"), *_task(runs, "ich")]
    assert _export(runs, tmp_path, *argv) == cli.EXIT_OK
    card = repository.read_model_card(tmp_path / "fmhct")
    assert card is not None
    assert [(g.name, g.tasks, g.probabilities_output) for g in card.groups] == [
        ("pretrained", [], None),
        ("vit_ich", ["ich"], "probabilities__vit_ich"),
    ]
    config = repository.read_config(tmp_path / "fmhct" / "config.pbtxt")
    assert [o.name for o in config.output] == [
        "embedding__pretrained",
        "probabilities__vit_ich",
        "embedding__vit_ich",
        "attention__vit_ich",
    ]
    assert outputs_for(card, [], True) == ["probabilities__vit_ich", "embedding__pretrained"]
    assert (tmp_path / "fmhct" / "1" / "model.reference.npz").is_file()  # the TensorRT gate's reference
