"""Records -> model batch: chat prompt + image, the answer's tokens, labels masked to the answer,
every coordinate slot with its target bin, and token-type masks (struct / desc / coord).

Prompt and answer are tokenized separately and concatenated, so training sees exactly the token
ids the model produces when it generates after the prompt. Batches are right-padded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from PIL import Image

from coordexp.codec import CoordCodec
from coordexp.data.images import open_rgb8
from coordexp.data.records import Record
from coordexp.data.render import build_messages, render_record
from coordexp.errors import UserError

IGNORE = -100
STRUCT, DESC, COORD = 1, 2, 3  # token types; 0 = not supervised (prompt, padding)
DESC_VALUE_RE = re.compile(r'"desc": "((?:[^"\\]|\\.)*)"')


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # what the model's forward takes
    labels: torch.Tensor  # [B, T] token ids inside the answer (+ end of turn), IGNORE elsewhere
    token_type: torch.Tensor  # [B, T] 0 / STRUCT / DESC / COORD
    coord_b: torch.Tensor  # [N] batch index of each coord slot
    coord_t: torch.Tensor  # [N] position of each coord slot (its logits are at t - 1)
    coord_bins: torch.Tensor  # [N] target bin of each slot
    prompt_lens: torch.Tensor  # [B]
    sample_ids: list[str] = field(default_factory=list)
    # packed rows only (data/packing.py): (row, start, length) of each sample [S, 3]
    segments: torch.Tensor | None = None

    def to(self, device) -> Batch:
        move = lambda t: t.to(device)
        return Batch({k: move(v) for k, v in self.inputs.items()}, move(self.labels),
                     move(self.token_type), move(self.coord_b), move(self.coord_t),
                     move(self.coord_bins), move(self.prompt_lens), self.sample_ids,
                     None if self.segments is None else move(self.segments))


def load_image(record: Record) -> Image.Image:
    image = open_rgb8(record.image_path)
    if image.size != (record.width, record.height):
        raise UserError(f"{record.image_path}: image is {image.size[0]}x{image.size[1]} but the "
                        f"record says {record.width}x{record.height}")
    return image


class Collator:
    """Turns records (or (record, answer-text) pairs) into a Batch for one processor."""

    def __init__(self, processor, codec: CoordCodec | None = None,
                 field_order: str = "desc_first"):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.codec = codec or CoordCodec()
        self.field_order = field_order
        self.coord_ids = coord_ids = self.codec.token_ids(self.tokenizer)  # by bin
        self.id_to_bin = torch.full((max(len(self.tokenizer), max(coord_ids) + 1),), -1)
        self.id_to_bin[torch.tensor(coord_ids)] = torch.arange(len(coord_ids))
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id
        self._prompt_tokens: int | None = None

    def check_descs(self, records: list[Record]) -> None:
        """A desc holding an added token's text ("cat <|coord_5|>", "a<|im_end|>b") would
        tokenize into that token (a fifth coord slot, an end of turn mid-answer): reject it,
        naming the record's file and line and the token."""
        added = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, added)))
        for rec in records:
            for i, obj in enumerate(rec.objects):
                found = pattern.search(obj.desc)
                if found:
                    raise UserError(f"{rec.where or rec.image}: object {i}: 'desc' "
                                    f"{obj.desc[:60]!r} contains the tokenizer's special token "
                                    f"{found.group()!r}; remove it from the desc")

    def prompt_text(self) -> str:
        return self.processor.apply_chat_template(build_messages(), tokenize=False,
                                                  add_generation_prompt=True)

    def answer_tokens(self, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of answer + end of turn, and the type of each."""
        enc = self.tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        desc_spans = [m.span(1) for m in DESC_VALUE_RE.finditer(answer)]
        types = []
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if self.id_to_bin[tid] >= 0:
                types.append(COORD)
            elif any(s < de and e > ds for ds, de in desc_spans):
                types.append(DESC)
            else:
                types.append(STRUCT)
        return enc["input_ids"] + [self.end_id], types + [STRUCT]

    def sample_length(self, record: Record, answer: str | None = None) -> int:
        """Tokens of the encoded sample (prompt with its image tokens, answer, end of turn) from
        the record's size alone: a pack plan needs every length before any image is read."""
        if answer is None:
            answer = render_record(record, self.codec, self.field_order)
        if self._prompt_tokens is None:  # the prompt's tokens with one image placeholder
            self._prompt_tokens = len(self.tokenizer(self.prompt_text())["input_ids"])
        ip = self.processor.image_processor
        patches = ip.get_number_of_image_patches(record.height, record.width, None)
        return self._prompt_tokens - 1 + patches // ip.merge_size ** 2 + \
            len(self.answer_tokens(answer)[0])

    def __call__(self, records: list[Record], answers: list[str] | None = None) -> Batch:
        if answers is None:
            answers = [render_record(r, self.codec, self.field_order) for r in records]
        return self.encode(records, [self.answer_tokens(a) for a in answers])

    def encode(self, records: list[Record], answers: list[tuple[list[int], list[int]]]) -> Batch:
        """Prompt + image + answer (token ids, types) per record -> a right-padded Batch."""
        prompt = self.prompt_text()
        rows, types, vision, prompt_lens = [], [], [], []
        for rec, (ids, tt) in zip(records, answers, strict=True):
            enc = self.processor(text=[prompt], images=[load_image(rec)], return_tensors="pt")
            p = enc["input_ids"].shape[1]
            rows.append(enc["input_ids"][0].tolist() + ids)
            types.append([0] * p + tt)
            vision.append(enc)
            prompt_lens.append(p)
        return self.pad(records, rows, types, vision, prompt_lens)

    def pad(self, records, rows, types, vision, prompt_lens) -> Batch:
        """Right-pad token rows (prompt + answer ids) and their types into one Batch."""
        B, T = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, T), self.pad_id)
        token_type = torch.zeros((B, T), dtype=torch.long)
        mm = torch.zeros((B, T), dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        for b, (row, tt, enc) in enumerate(zip(rows, types, vision, strict=True)):
            input_ids[b, : len(row)] = torch.tensor(row)
            token_type[b, : len(row)] = torch.tensor(tt)
            attn[b, : len(row)] = 1
            mm[b, : enc["mm_token_type_ids"].shape[1]] = enc["mm_token_type_ids"][0]
        labels = torch.where(token_type > 0, input_ids, IGNORE)
        coord_b, coord_t = (token_type == COORD).nonzero(as_tuple=True)
        inputs = {"input_ids": input_ids, "attention_mask": attn, "mm_token_type_ids": mm,
                  "pixel_values": torch.cat([v["pixel_values"] for v in vision]),
                  "image_grid_thw": torch.cat([v["image_grid_thw"] for v in vision])}
        return Batch(inputs, labels, token_type, coord_b, coord_t,
                     self.id_to_bin[input_ids[coord_b, coord_t]], torch.tensor(prompt_lens),
                     [r.image for r in records])
