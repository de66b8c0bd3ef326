"""Typed configuration of the data-preparation stages (the ``prep`` section of a pipeline file).

Every stage owns one class here; a stage's config digest covers exactly its own class (plus the
input list), so changing a filter threshold makes the filter shards stale and, through their new
output digests, everything downstream — but not the clean stage.
Defaults for the quality filters are datatrove's (GopherQualityFilter, GopherRepetitionFilter,
C4QualityFilter, FineWebQualityFilter), so results compare with theirs.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import field_validator, model_validator

from shardflow.storage.doc_split import DEFAULT_ADD_BOS, DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadConfig(_Section):
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    id_field: str = "id"
    text_field: str = "text"
    source_field: str | None = None
    max_doc_bytes: int = Field(8 << 20, gt=0, description="Records (JSONL lines, Parquet texts) longer than this are quarantined (reason 'too_long'), read in bounded memory.")


class CleanConfig(_Section):
    enabled: bool = True
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    remove_control_chars: bool = True
    remove_invisible_chars: bool = True
    normalize_whitespace: bool = True
    keep_indentation: bool = Field(True, description="Leading spaces/tabs of a line survive whitespace normalization (code blocks); other runs collapse to one space.")
    max_newlines: int = Field(2, ge=1, description="Longer runs of newlines (blank lines) are cut to this many.")
    fix_mojibake: bool = Field(False, description="Repair mis-decoded text (ftfy.fix_encoding); needs the optional package ftfy.")
    remove_boilerplate_lines: bool = True
    boilerplate_patterns: list[str] = Field(default_factory=lambda: [
        r"(?i)^\s*(all rights reserved|cookie policy|privacy policy|terms of (use|service)|click here|subscribe( now)?|skip to (main )?content)\b.*$",
        r"(?i)^\s*(previous|next|up|home|index|modules)\s*(\||$)",
    ])
    mask_emails: bool = False
    mask_ips: bool = False
    email_replacement: str = "<EMAIL>"
    ip_replacement: str = "<IP>"
    min_chars: int = Field(1, description="Documents shorter than this after cleaning are dropped ('empty_after_clean').")

    @field_validator("boilerplate_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        import re

        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"boilerplate_patterns[{i}] {pattern!r} is not a valid regular expression: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _ftfy_available(self) -> "CleanConfig":
        if self.enabled and self.fix_mojibake:
            import importlib.util

            if importlib.util.find_spec("ftfy") is None:
                raise ValueError("fix_mojibake needs the optional package 'ftfy' (pip install 'shardflow[clean]' or pip install ftfy), or set fix_mojibake: false")
        return self


class LanguageFilterConfig(_Section):
    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    threshold: float = Field(0.65, ge=0, le=1, description="Minimum normalized probability of the top language.")
    max_chars: int = Field(2048, gt=0, description="Only this prefix of a document is classified (speed; accuracy in docs/filters.md).")


class GopherQualityConfig(_Section):
    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] = Field(default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])


class GopherRepetitionConfig(_Section):
    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = Field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[tuple[int, float]] = Field(default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])


class C4Config(_Section):
    enabled: bool = True
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebConfig(_Section):
    enabled: bool = True
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class FilterConfig(_Section):
    language: LanguageFilterConfig = Field(default_factory=LanguageFilterConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    write_dropped: bool = Field(False, description="Also write dropped documents (with reason) under stages/filter/_dropped/.")


class DedupConfig(_Section):
    """Exact and near-duplicate removal; docs/dedup.md explains every option with measured figures."""

    exact: bool = Field(True, description="Drop documents whose normalized text (lowercase, NFKC, no punctuation, collapsed whitespace) equals another's.")
    near: bool = Field(True, description="Drop MinHash-LSH near duplicates (word n-gram shingles), each only in favour of a kept document it is itself verified similar to.")
    ngram: int = Field(5, ge=1, description="Words per shingle; shorter documents are one shingle.")
    num_bands: int = Field(28, ge=1, description="LSH bands: two documents are candidates when any band's hash is equal.")
    rows_per_band: int = Field(4, ge=1, description="Signature values per band: num_bands * rows_per_band permutations.")
    seed: int = Field(1, ge=0)
    verify: Literal["exact", "signature", "off"] = Field(
        "exact", description="How a candidate pair is confirmed: 'exact' = exact shingle Jaccard (re-reads the text of candidates "
        "whose MinHash estimate is not far below the threshold), 'signature' = Jaccard estimated from the stored MinHash "
        "signatures (no text re-read), 'off' = every LSH candidate counts.")
    jaccard_threshold: float = Field(0.5, gt=0, le=1, description="A candidate pair is a near duplicate when its verified similarity is at least this.")
    num_buckets: int = Field(8, ge=1, description="Band buckets are hash-partitioned into this many files (the parallelism of the bucket phase).")
    verify_all_pairs_up_to: int = Field(64, ge=2, description="LSH groups up to this size verify every pair; larger ones pair each member with the group's first verify_window members by survivor rank and its verify_window neighbours in signature order.")
    verify_window: int = Field(16, ge=1, description="Pairs per member in LSH groups larger than verify_all_pairs_up_to (see there).")
    incremental: Literal["append", "full"] = Field(
        "append", description="When only new input shards arrived since the last cluster run: 'append' checks just the new "
        "documents against the kept ones and each other, keeps every earlier decision and writes drop lists for the new "
        "shards only; 'full' re-clusters everything (an earlier survivor may then lose to a new document).")


class TokenizerConfig(_Section):
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 8000
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    sample_docs: int = 20_000
    sample_max_chars: int = 20_000_000
    seed: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 3
    unk_id: int = 0
    num_threads: int = Field(2, description="Training threads for BPE (output does not depend on it); unigram always trains with 1 thread, because its result does.")
    normalization_rule_name: Literal["nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"] = "nmt_nfkc"
    split_digits: bool = True
    max_sentence_length: int = Field(16384, description="Sample lines longer than this many bytes are cut at whitespace (sentencepiece would skip them).")
    retrain_on_new_data: bool = Field(False, description="Retrain when the documents change (and so re-tokenize everything). Default: "
                                      "trained once, kept while new inputs arrive (append-only corpora); a tokenizer config change or --force retrains.")


class TokenizeConfig(_Section):
    seq_len: int = 256
    rows_per_member: int = Field(0, description="Sequences per tar member; 0 = as many as fit in ~1 MiB.")
    samples_per_shard: int = Field(8192, description="Sequences per output tar shard.")
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED
    num_threads: int = 2
    add_bos: bool = DEFAULT_ADD_BOS
    write_doc_boundaries: bool = False
    pack_incremental: Literal["append", "repack"] = Field(
        "append", description="When only new token streams arrived since the last pack: 'append' packs just them into new "
                              "tars listed after the earlier ones in index.json (earlier tars untouched, work in proportion to "
                              "what arrived); 'repack' rewrites every tar in shard order, as a from-scratch run would. A changed "
                              "or removed stream, or a tokenizer or pack config change, always repacks; so does --force on an "
                              "up-to-date pack (a compaction).")
    encode_batch_chars: int = Field(4_000_000, description="Characters of text handed to sentencepiece per multithreaded encode call.")


class PrepConfig(_Section):
    inputs: list[str] = Field(default_factory=list, description="Input URIs or globs (JSONL/.gz/.zst, Parquet).")
    read: ReadConfig = Field(default_factory=ReadConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    workers: int = Field(2, description="Parallel shards (processes locally, tasks on Ray).")
