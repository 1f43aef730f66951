"""A tiny random checkpoint with a BPE tokenizer trained on given texts: the model many tests
play, train or adapt (its weights are random; the tests compare behaviour, not quality)."""
import model as M
from tokenizer import train_tokenizer

# sft.py flags for a new tiny model from scratch (its defaults train a LoRA adapter on SmolLM2)
SCRATCH = ["--preset", "tiny", "--lora-rank", "0", "--lr", "3e-3"]


def save_tiny_checkpoint(path, texts: list[str], vocab_size: int, std: float | None = None, **config):
    """Tokenizer and model in `path` (HF layout); `config` overrides the small shape below."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save(path)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096) | config
    model = M.Transformer(M.ModelConfig(vocab_size=tokenizer.vocab_size, **shape))
    M.save_model(M.init_weights(model, seed=0, **({} if std is None else {"std": std})), path, tokenizer_dir=path)
    return path
