"""A byte-level tokenizer for the project's own checkpoints: every text encodes, nothing is unknown.

Ids 0 and 1 are the begin/end-of-sentence tokens (as in DeepSeek-V3's config), bytes follow, then
DeepSeek's chat-format tokens (model/chat_tokens.py) as added tokens. tokenizer_config.json
carries the chat template (model/chat_template.jinja).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from model.chat_tokens import BOS, EOS, FORMAT_TOKENS

BOS_TOKEN, EOS_TOKEN = BOS, EOS
NUM_SPECIAL = 2
BYTE_VOCAB = 256
FIRST_FORMAT_ID = NUM_SPECIAL + BYTE_VOCAB
TOKENIZER_VOCAB = FIRST_FORMAT_ID + len(FORMAT_TOKENS)
CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")


def build_tokenizer() -> Tokenizer:
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    vocab.update({ch: NUM_SPECIAL + i for i, ch in enumerate(byte_chars)})
    vocab.update({t: FIRST_FORMAT_ID + i for i, t in enumerate(FORMAT_TOKENS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    return tok


def chat_template() -> str:
    return CHAT_TEMPLATE_FILE.read_text()


def _byte_of(ch: str) -> int:
    # GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to 256+.
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
        "chat_template": chat_template(),
    }


def write_tokenizer(out_dir: Path) -> None:
    build_tokenizer().save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False))
