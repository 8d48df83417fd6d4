"""A tiny sentence-transformers model built on the spot (no download): the offline text encoder of the tests."""

from __future__ import annotations

from pathlib import Path


def tiny_sentence_model(path: Path) -> Path:
    """A 1-layer BERT with a 31-word vocabulary, saved as a sentence-transformers directory (no download)."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # earlier releases
        from sentence_transformers import models  # type: ignore[no-redef]
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "heat", "toy", "story", "action", "crime", "animation",
             "genres", "title", "(", ")", ".", ",", ":", "1995", *[f"w{i}" for i in range(12)]]
    raw = path / "raw"
    raw.mkdir()
    (raw / "vocab.txt").write_text("\n".join(words) + "\n")
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(raw / "vocab.txt"), do_lower_case=True)
    assert tokenizer.tokenize("Heat, w3") == ["heat", ",", "w3"], "the fixture's vocabulary must be in use"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
    BertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    st = SentenceTransformer(modules=[models.Transformer(str(raw), max_seq_length=32), models.Pooling(8, "mean")],
                             device="cpu")
    st.save(str(path / "tiny"))
    return path / "tiny"
