"""Evaluation through real lm-eval on the tiny model: prompts, adapter, answer extraction."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file, save_file

from nslora import answers, prompts
from nslora.config import EvalConfig, LoraParams, TrainConfig
from nslora.evaluation.harness import adapter_changes_logits, build_lm, evaluate, run_lm_eval
from nslora.models import load_tokenizer
from nslora.schemas import EXAMPLES, PREDICTIONS, to_table, write_table
from nslora.numerical.training import encode, init_adapter

EVAL = EvalConfig(batch_size=4, max_new_tokens=8)


@pytest.fixture
def test_parquet(examples, tmp_path):
    return write_table(examples(6, "test", system_prompt="Count carefully."), tmp_path / "test.parquet", EXAMPLES)


def test_lm_eval_context_is_the_training_prompt(tiny_model_dir, test_parquet, examples):
    """Chat template and system prompt are applied identically in training and evaluation."""
    lm = build_lm(tiny_model_dir, None, EVAL, precision="fp32", device="cpu")
    results = run_lm_eval(lm, test_parquet, "Count carefully.", EVAL)
    tokenizer = load_tokenizer(tiny_model_dir)
    docs = {row.id: row for row in examples(6, "test", system_prompt="Count carefully.").itertuples()}
    for sample in results["samples"]["nslora_cot_zeroshot"]:
        context = sample["arguments"][0][0]
        row = docs[sample["doc"]["id"]]
        assert context == prompts.prompt_text(tokenizer, "Count carefully.", row.question)
        trained = encode(tokenizer, row, max_length=512)
        assert tokenizer(context, add_special_tokens=False)["input_ids"] == trained.input_ids[:trained.prompt_tokens]


def test_evaluate_writes_predictions_and_accuracy(tiny_model_dir, test_parquet):
    summary, predictions = evaluate(tiny_model_dir, None, test_parquet, "Count carefully.", EVAL, precision="fp32")
    to_table(predictions, PREDICTIONS)
    assert summary["n"] == len(predictions) == 6 and summary["questions_per_s"] > 0


def test_lm_eval_scores_right_answers_through_the_task_yaml_and_filters(tiny_model_dir, test_parquet, examples):
    """Scripted replies (the model's generate replaced, nothing else) go through lm-eval's real task
    YAML, filters and metric: right answers score, in the format each filter accepts."""
    rows = examples(6, "test", system_prompt="Count carefully.")
    gold = [int(a) for a in rows.final_answer]
    replies = [
        f"2 legs each, so the total is 18.\n#### {gold[0]}",  # both filters: the number after ####
        f"The total is {gold[1]} legs.",                         # flexible only: no '#### ' line
        f"#### {gold[2] + 1}",                                   # neither: wrong number
        f"First {gold[3]}, but then 99 more.",                   # neither: flexible takes the last number
        f"#### {gold[4]}",                                       # both
        f"Counting...\n#### {gold[5]}",                        # both
    ]
    lm = build_lm(tiny_model_dir, None, EVAL, precision="fp32", device="cpu")

    def scripted(requests, disable_tqdm=False):
        return [next(reply for row, reply in zip(rows.itertuples(), replies) if row.question in r.args[0])
                for r in requests]

    lm.generate_until = scripted
    summary, predictions = evaluate(tiny_model_dir, None, test_parquet, "Count carefully.", EVAL, lm=lm)
    by_question = predictions.set_index("question").loc[list(rows.question)]
    assert by_question["correct_strict"].tolist() == [True, False, False, False, True, True]
    assert by_question["correct_flexible"].tolist() == [True, True, False, False, True, True]
    assert summary["accuracy"] == pytest.approx(4 / 6) and summary["accuracy_strict"] == pytest.approx(3 / 6)
    assert by_question["output"].tolist() == replies


def test_adapter_changes_logits_as_loaded_by_the_evaluator(tiny_model_dir, examples, tmp_path):
    adapter = init_adapter(tiny_model_dir, examples(4), LoraParams(r=4), TrainConfig(batch_size=2), tmp_path / "a")
    # A fresh LoRA has B = 0 and must not change anything ...
    assert adapter_changes_logits(tiny_model_dir, adapter) == 0.0
    # ... a trained one (B != 0) must, or the evaluator silently dropped it.
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v + 0.05 for k, v in weights.items()}, str(adapter / "adapter_model.safetensors"))
    assert adapter_changes_logits(tiny_model_dir, adapter) > 1e-3


def test_generation_speedups_keep_outputs(tiny_model_dir, test_parquet):
    """The evaluator's generation fixes (contiguous head input, adapter dtype) change nothing."""
    from lm_eval.models.huggingface import HFLM

    stock = HFLM(pretrained=str(tiny_model_dir), batch_size=4, device="cpu", dtype="float32")
    _, expected = evaluate(tiny_model_dir, None, test_parquet, "Count carefully.", EVAL, lm=stock)
    _, ours = evaluate(tiny_model_dir, None, test_parquet, "Count carefully.", EVAL, precision="fp32")
    assert expected["output"].tolist() == ours["output"].tolist()


def test_packed_linear_weights_give_bit_identical_logits(tiny_model_dir):
    """Generation's pre-packed bf16 weights are a layout change only: logits equal the plain
    `linear`'s bit for bit, at decoding and prefill sizes; with gradients on, the plain path runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from nslora.models import pack_linear_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    batches = [torch.randint(5, 300, (rows, width), generator=torch.Generator().manual_seed(rows))
               for rows, width in ((1, 1), (7, 1), (33, 1), (4, 40))]
    with torch.inference_mode():
        expected = [model(ids).logits for ids in batches]
    if not pack_linear_weights(model):
        pytest.skip("oneDNN has no bf16 support on this CPU: nothing is packed")
    with torch.inference_mode():
        for ids, logits in zip(batches, expected):
            assert torch.equal(model(ids).logits, logits), ids.shape
    model(batches[0]).logits.sum().backward()  # the packed copy is frozen: training must not use it
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


@pytest.mark.parametrize("output, flexible, strict", [
    ("Each dog has 4 legs.\n2 * 4 = 8\n#### 8", "8", "8"),
    ("The answer is 1,234.", "1,234.", "[invalid]"),  # as lm-eval; normalize drops the dot
    ("no digits here", "[invalid]", "[invalid]"),
    ("#### -3.50 dollars", "-3.50", "-3.50"),
])
def test_answer_extraction(output, flexible, strict):
    assert answers.flexible_extract(output) == flexible
    assert answers.strict_match(output) == strict


def test_answer_comparison_normalises_like_lm_eval():
    assert answers.is_correct("1,234", "1234")
    assert answers.is_correct("$8.", "8")
    assert answers.is_correct("3.50", "3.5")
    assert not answers.is_correct("[invalid]", "invalid")
    assert answers.flexible_extract("so it is kitchen", numeric=False) == "kitchen"
    assert answers.strict_match("#### TRUE\n", numeric=False) == "TRUE"


@pytest.mark.parametrize("attention", ["sdpa", "nslora_decode"])
@pytest.mark.parametrize("beginning", ["", "<|im_start|>system\nYou are a careful assistant.<|im_end|>\nQ: "])
def test_continuous_batching_matches_one_prompt_at_a_time(tiny_model_dir, beginning, attention, monkeypatch):
    """Rows that finish leave the batch, waiting prompts join it with a left-padded cache, columns
    that only padding uses are dropped, a beginning all prompts share is prefilled once: every
    continuation still equals greedy decoding of its prompt alone, without a cache. With the CPU
    decoding attention the cache keeps keys transposed and grows by one spare column at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from nslora.attention import DECODE, register
    from nslora.evaluation.generation import TransposedKeysLayer, greedy_generate

    register(DECODE)
    monkeypatch.setattr(TransposedKeysLayer, "spare", 1)  # every decoding step outgrows the buffer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = ["How many legs do 3 chickens have?", "12 + 7 - 3 =", "Each dog has 4 legs, so 2 dogs have",
             "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16", "Q:", "State the final answer to the following "
             "arithmetic problem: 12 + 7 - 3", "6 + 8 =", "You are a careful assistant.", "A: Let's think"]
    prompts = [tokenizer.encode(beginning + t) for t in texts]
    if beginning:  # the shared part is what the prefill computes once
        assert len(os.path.commonprefix(prompts)) >= len(tokenizer.encode(beginning)) - 1 > 5
    max_new = 12

    def stopped(tokens):  # each row stops after 2..10 tokens, decided by its own first token
        return len(tokens) >= 2 + tokens[0] % 9

    stop_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = []
            while True:
                tokens.append(int(model(torch.tensor([prompt + tokens])).logits[0, -1].argmax()))
                if tokens[-1] in stop_ids or len(tokens) >= max_new or stopped(tokens):
                    break
            expected.append(tokens)
    assert len({len(t) for t in expected}) >= 3  # rows really finish at different steps
    finished = []
    for batch_size in (1, 3, 4, 16):
        assert greedy_generate(model, prompts, max_new, batch_size, stop_ids, stopped,
                               progress=finished.append) == expected, f"batch size {batch_size}"
    assert sum(finished) == 4 * len(prompts)


@pytest.mark.parametrize("mask_dtype", ["bool", "additive", "none"])
def test_decode_attention_equals_sdpa(mask_dtype):
    """One query per row, grouped heads, padding masked: the same output as transformers' sdpa
    attention, from a plain cache view and from a TransposedKeysLayer's whole buffers (spare
    columns zero, masked out)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from nslora.attention import decode_attention
    from nslora.evaluation.generation import TransposedKeysLayer

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 6, 2, 9, 8
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    keys, values = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    attends = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    attends[0, ..., 2:5] = attends[2, ..., :3] = False
    mask = {"bool": attends, "additive": torch.zeros(batch, 1, 1, length).masked_fill(~attends, -1e9),
            "none": None}[mask_dtype]
    expected, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=0.3)
    layer = TransposedKeysLayer()
    layer.update(keys[:, :, :4], values[:, :, :4])
    buffered_keys, buffered_values = layer.update(keys[:, :, 4:], values[:, :, 4:])
    assert buffered_keys.buffer.shape[-1] > length  # spare columns the attention must ignore
    for k, v in ((keys, values), (buffered_keys, buffered_values)):
        output, _ = decode_attention(module, query, k, v, mask, scaling=0.3)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_prefill_computes_a_shared_beginning_once_with_the_same_logits(tiny_model_dir):
    """Prompts sharing a beginning: its cache is computed for one row and copied, each prompt's own
    tokens follow after padding; the last logits equal each prompt's own forward (positions, mask)."""
    import torch
    from transformers import AutoModelForCausalLM

    from nslora.evaluation.generation import prefill

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    beginning = "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
    prompts = [tokenizer.encode(beginning + t) for t in ("Q: 2 + 2 =", "Q: How many legs do 3 cats and a hen have?", "A")]
    shared = len(os.path.commonprefix(prompts))
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    with torch.no_grad():
        cache, mask, logits = prefill(prompts, model, torch.device("cpu"))
        hook.remove()
        assert forwards == [(1, shared), (3, max(map(len, prompts)) - shared)]
        assert mask.tolist()[2] == [1] * shared + [0] * (len(prompts[1]) - len(prompts[2])) + [1] * (len(prompts[2]) - shared)
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(logits[row], model(torch.tensor([prompt])).logits[0, -1], atol=1e-5, rtol=1e-5)


def test_greedy_tokens_pick_the_first_largest_logit_as_argmax_does():
    """Two-pass argmax over vocabulary blocks: same index as float32 argmax, ties included (bf16 logits
    rounded to a few levels tie across and within blocks), for block-divisible and odd vocabularies."""
    import torch

    from nslora.evaluation.generation import greedy_tokens

    generator = torch.Generator().manual_seed(0)
    for rows, vocab in ((6, 151936), (5, 49152), (4, 640), (3, 1000)):
        logits = (torch.randn(rows, vocab, generator=generator) * 2).round().to(torch.bfloat16)
        logits[0, -1] = 50  # the maximum in the last block
        logits[1, 7] = logits[1, vocab - 7] = 50  # a tie between the first and the last block
        expected = logits.float().argmax(-1)
        assert expected[1] == 7
        assert torch.equal(greedy_tokens(logits), expected), vocab
        assert torch.equal(greedy_tokens(logits.float()), expected), vocab
