"""Evaluation against a real CPU rollout server on a tiny random Qwen3-MoE (the quickstart shape).

Checks: accuracy and pass@k from real generations scored by the real verifier; the same seed gives
the same numbers twice; a verifier that raises is counted, not fatal; bad eval configs name the
field; file sets keep their first ``num_prompts`` rows; the CLI prints a table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vespo.config.loader import load_run_config
from megatron_vespo.driver.evaluation import Evaluator, format_table
from megatron_vespo.rewards.registry import register_verifier
from megatron_vespo.rewards.synthetic import synthetic_partial_credit
from rollout_sglang.client import SGLangClient
from tests.rollout.helpers import cpu_server
from typed_config import ConfigError

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("OMP_NUM_THREADS", "1")


@register_verifier("test_eval_always_raises")
def _raises(request):
    raise RuntimeError("broken verifier")


@register_verifier("test_eval_exact_match")
def _exact(request):
    return 1.0 if synthetic_partial_credit(request) == 1.0 else 0.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The quickstart model (vocab 16) with random weights, as an HF directory."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = load_run_config(REPO / "configs/quickstart.yaml").model
    hf = Qwen3MoeConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                        moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
                        num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
                        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval_model") / "model"
    Qwen3MoeForCausalLM(hf).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with cpu_server(model_dir, tmp_path_factory.mktemp("eval_server") / "server.log") as url:
        yield url


def eval_config(tmp_path: Path, *extra: str):
    rows = [{"prompt_ids": [10, d, 1, 2, 12], "ground_truth": [2, 1, d]} for d in range(6)]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_run_config(REPO / "configs/quickstart.yaml", [
        "eval.every_steps=4", "eval.temperature=1.0",
        "eval.sets=[{name: heldout, num_prompts: 8, n_samples: 4}, "
        f"{{name: file, path: {path}, num_prompts: 5, n_samples: 3, verifier: test_eval_exact_match}}, "
        "{name: broken, num_prompts: 3, n_samples: 2, verifier: test_eval_always_raises}]", *extra])


def test_accuracy_pass_at_k_errors_and_determinism(server, tmp_path):
    evaluator = Evaluator(eval_config(tmp_path))
    assert [len(s.rows) for s in evaluator.sets] == [8, 5, 3]
    assert [r.prompt_ids[1] for r in evaluator.sets[1].rows] == [0, 1, 2, 3, 4]  # the first rows of the file
    first = evaluator.evaluate(server)
    heldout, file_set, broken = first
    assert [len(x) for x in heldout.scores] == [4] * 8 and [len(x) for x in file_set.scores] == [3] * 5
    # Partial credit in [0, 1]; a random policy gets some positions right, rarely all three.
    metrics = evaluator.run(server, step=4)
    assert 0.0 < metrics["eval/heldout/accuracy"] < 0.6
    assert metrics["eval/heldout/accuracy"] == pytest.approx(
        sum(sum(x) for x in heldout.scores) / 32)
    assert metrics["eval/heldout/pass@k"] == sum(1 for x in heldout.scores if max(x) >= 1.0) / 8
    assert set(s for x in file_set.scores for s in x) <= {0.0, 1.0}
    assert metrics["eval/broken/verifier_errors"] == 6 and metrics["eval/broken/accuracy"] == 0.0
    assert metrics["eval/heldout/verifier_errors"] == 0 and metrics["eval/step"] == 4.0
    assert metrics["eval/heldout/response_len_mean"] <= 3
    # Same seed, same weights: the same samples, hence the same numbers.
    assert [r.scores for r in evaluator.evaluate(server)] == [r.scores for r in first]
    table = format_table(metrics, ["heldout", "file", "broken"])
    assert "heldout" in table and "pass@k" in table and len(table.splitlines()) == 4


def test_scores_match_the_server_responses(server, tmp_path):
    """Accuracy is the verifier's mean over exactly the responses the server gives for these prompts."""
    import asyncio

    evaluator = Evaluator(eval_config(tmp_path))
    result = evaluator.evaluate(server)[0]
    eval_set = evaluator.sets[0]

    async def generate():
        async with SGLangClient(server) as client:
            return await client.generate_batch([r.prompt_ids for r in eval_set.rows], evaluator.params, n=4,
                                               return_logprob=False, rid_prefix=f"eval-{evaluator.seed}-heldout")

    from megatron_vespo.rewards.registry import ScoreRequest

    groups = asyncio.run(generate())
    expected = [[synthetic_partial_credit(ScoreRequest(list(r.output_ids), None, row.ground_truth, row.prompt_ids))
                 for r in g] for row, g in zip(eval_set.rows, groups)]
    assert result.scores == expected


def test_held_out_prompts_depend_on_the_seed_and_due_steps(tmp_path):
    cfg = eval_config(tmp_path)
    a, b = Evaluator(cfg, seed=1), Evaluator(cfg, seed=2)
    assert [r.index for r in a.sets[0].rows] != [r.index for r in b.sets[0].rows]
    assert [r.index for r in a.sets[0].rows] == [r.index for r in Evaluator(cfg, seed=1).sets[0].rows]
    assert [a.due(s) for s in range(9)] == [False, False, False, False, True, False, False, False, True]
    # A loop doing 3 optimizer steps per rollout step: due when it crosses a multiple of 4.
    assert [a.due(s, previous=s - 3) for s in (3, 6, 9, 12)] == [False, True, True, True]
    assert not Evaluator(load_run_config(REPO / "configs/quickstart.yaml", ["eval.every_steps=2", "eval.sets=[]"])).due(2)  # no sets


@pytest.mark.parametrize("sets, field", [
    ("[{name: x, verifier: no_such_verifier}]", "eval.sets[0].verifier"),
    ("[{name: x}, {name: x}]", "eval.sets[1].name"),
    ("[{name: 'a/b'}]", "eval.sets[0].name"),
])
def test_bad_eval_config_names_the_field(tmp_path, sets, field):
    cfg = load_run_config(REPO / "configs/quickstart.yaml", [f"eval.sets={sets}"])
    with pytest.raises(ConfigError) as info:
        Evaluator(cfg)
    assert field in str(info.value)


def test_cli_against_a_running_server(server, tmp_path):
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text((REPO / "configs/quickstart.yaml").read_text().replace(
        "model: models/quickstart_moe.yaml", f"model: {REPO / 'configs/models/quickstart_moe.yaml'}"))
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools/evaluate.py"), str(cfg_path),
                           "eval.sets=[{name: heldout, num_prompts: 4, n_samples: 2}]", "--url", server,
                           "--json", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].split()[:3] == ["set", "accuracy", "pass@k"]
    assert json.loads(out.read_text())["eval/heldout/num_prompts"] == 4.0


def test_cli_boots_cpu_servers_on_a_checkpoint_and_matches_the_url_mode(server, model_dir, tmp_path):
    """--checkpoint boots a CPU server (behind the router) on the HF dir: same weights, same seeds,
    so the same numbers as evaluating the running server directly."""
    sets = "eval.sets=[{name: heldout, num_prompts: 4, n_samples: 2}]"
    results = []
    for source in (["--checkpoint", str(model_dir)], ["--url", server]):
        out = tmp_path / f"{source[0][2:]}.json"
        proc = subprocess.run([sys.executable, str(REPO / "tools/evaluate.py"), str(REPO / "configs/quickstart.yaml"),
                               sets, *source, "--json", str(out)], capture_output=True, text=True, timeout=180,
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(out.read_text()))
    keys = ("eval/heldout/accuracy", "eval/heldout/pass@k", "eval/heldout/response_len_mean")
    assert [results[0][k] for k in keys] == [results[1][k] for k in keys]
