"""Tokenizer and chat format, stored in a checkpoint's HF files (tokenizer.json, tokenizer_config.json).

- One tokenizer class for every checkpoint: the `tokenizers` library reads any HF
  `tokenizer.json`, ours or downloaded, so there is no second code path.
- From-scratch models get a small byte-level BPE trained on our own generated text. The chat
  markers and the protocol's tags are added tokens, so `<call`, `</call>`, `<answer>` ... are one
  id each: a tiny model learns the protocol faster when a tag is one symbol, and a tag can never
  be split differently in two contexts.
- The chat format is ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), the format of SmolLM2 and
  Qwen2/3. It is rendered in Python (no Jinja at run time); the Jinja template written into
  tokenizer_config.json is the same format, for other tools, and a test checks the two agree.
  A checkpoint whose template is not ChatML is refused with a clear error rather than rendered
  in a format it was not trained on.
- Some ChatML templates open a conversation that has no system message with a default one
  (SmolLM2: "You are a helpful AI assistant named SmolLM, ..."). The model was trained with
  it, so `render_chat` inserts it too, read from the template's own system-turn literal.
  Text that continues a conversation (a state message, the next user turn) is `render_turns`.
"""
import json
import re
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# The protocol's tags (env.py speaks them). `<call`, `<state`, `<result` are open tags that take
# attributes, so the token is the tag's opening without its `>`.
PROTOCOL_TAGS = ("<think>", "</think>", "<call", "</call>", "<answer>", "</answer>",
                 "<state", "</state>", "<result", "</result>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A whole system turn written as one string literal in a template: its default system prompt.
# (A template that only concatenates '<|im_start|>system\n' + content has no such literal.)
_DEFAULT_SYSTEM = re.compile(r"""(['"])<\|im_start\|>system(?:\n|\\n)([^'"{}]*?)<\|im_end\|>(?:\n|\\n)\1""")


class Tokenizer:
    """Encode/decode plus the ChatML chat format, for a checkpoint folder's tokenizer files."""

    def __init__(self, tokenizer: HFTokenizer, config: dict):
        self.tokenizer = tokenizer
        self.config = config
        template = config.get("chat_template") or ""
        if isinstance(template, list):  # some files hold named templates: [{"name", "template"}]
            template = next((t["template"] for t in template if t.get("name") == "default"), "")
        if IM_START not in template or IM_END not in template:
            raise ValueError("tokenizer_config.json: chat_template is not ChatML "
                             "(<|im_start|>/<|im_end|>); only ChatML chat models are supported")
        for token in (IM_START, IM_END):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer.json: chat token {token} is not in the vocabulary")
        self.im_start_id = tokenizer.token_to_id(IM_START)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        eos = _token_text(config.get("eos_token"))
        eos_id = tokenizer.token_to_id(eos) if eos else None
        # A chat turn ends at <|im_end|> even where the config names another eos token.
        self.eos_token_ids = sorted({self.im_end_id} | ({eos_id} if eos_id is not None else set()))
        pad = _token_text(config.get("pad_token")) or eos
        self.pad_token_id = tokenizer.token_to_id(pad) if pad else self.im_end_id
        match = _DEFAULT_SYSTEM.search(template)
        self.default_system_prompt = match.group(2).replace("\\n", "\n") if match else None

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: no {name}")
        config = json.loads((path / "tokenizer_config.json").read_text())
        if not config.get("chat_template") and (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text()
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json")), config)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """ChatML text of a conversation from its start, as the checkpoint's template renders it
        (with its default system prompt where the conversation has no system message)."""
        if self.default_system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system_prompt}] + list(messages)
        return self.render_turns(messages, add_generation_prompt)

    @staticmethod
    def render_turns(messages: list[dict], add_generation_prompt: bool = True) -> str:
        """ChatML text of these messages alone (a continuation: no default system prompt);
        ends with an open assistant turn when asked."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n")


def _token_text(token) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def train_tokenizer(texts, vocab_size: int = 2048, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with ChatML markers and protocol tags as single tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [END_OF_TEXT, IM_START, IM_END]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # Protocol tags: matched before BPE like special tokens, but kept by decode(skip_special_tokens).
    tok.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in PROTOCOL_TAGS])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TEMPLATE,
              "bos_token": None, "eos_token": IM_END, "pad_token": END_OF_TEXT,
              "unk_token": None, "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    return Tokenizer(tok, config)
