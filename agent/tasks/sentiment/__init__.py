"""Review sentiment: polarity from a verbalizer, aspects in the same call, a labelled fallback.

* `text`: untrusted review text -> what the model is shown (`clean_text`, `remove_instructions`,
  `prepare_text`).
* `lexicon`: the zh/en/emoji lexicon baseline and fallback (`lexicon_probabilities`).
* `analyzer`: `SentimentAnalyzer` (one call per review: the label's log-probabilities, then
  ``term | label`` aspect lines, `parse_aspect_lines`) and its `SentimentConfig`.
* The schemas (`SentimentResult`, `AspectSentiment`, `Polarity`, ...) are
  `agent.domain.predictions.sentiment`; `detect_language` is `agent.domain.text`. All are
  re-exported here.
"""

from agent.domain.predictions import (
    POLARITIES,
    AspectsAnswer,
    AspectSentiment,
    Language,
    Polarity,
    SentimentFailure,
    SentimentResult,
    aspects_json_schema,
    normalise_polarity,
    normalise_probability,
)
from agent.domain.text import detect_language
from agent.tasks.sentiment.analyzer import (
    SentimentAnalyzer,
    SentimentConfig,
    Verbalized,
    clause_with,
    parse_aspect_lines,
    verbalizer_probabilities,
)
from agent.tasks.sentiment.lexicon import lexicon_polarity, lexicon_probabilities
from agent.tasks.sentiment.text import MAX_CHARS, clean_text, prepare_text, remove_instructions

__all__ = [
    "MAX_CHARS", "POLARITIES", "AspectSentiment", "AspectsAnswer", "Language", "Polarity", "SentimentAnalyzer",
    "SentimentConfig", "SentimentFailure", "SentimentResult", "Verbalized", "aspects_json_schema", "clause_with",
    "clean_text", "parse_aspect_lines",
    "detect_language", "lexicon_polarity", "lexicon_probabilities", "normalise_polarity", "normalise_probability",
    "prepare_text", "remove_instructions", "verbalizer_probabilities",
]
