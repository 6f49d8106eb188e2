"""Amazon Review Data 2018 "All_Beauty" 5-core (Ni, Li & McAuley, EMNLP 2019).

5,269 reviews, 991 users, 85 items; fields `overall` (1-5 stars), `reviewerID`, `asin`,
`reviewText`, `summary`, `unixReviewTime` (seconds). No product titles.
"""

from __future__ import annotations

from pathlib import Path

from agent.ingest._common import LoadResult, RowSink, jsonl_rows, open_text, resolve_file
from agent.ingest.report import LoadReport

DATASET = "amazon-beauty"
SUBDIR = "amazon-beauty-reviews"
FILENAME = "All_Beauty_5.jsonl.gz"



def review_text(summary: object, text: object) -> str | None:
    """Join the review headline and body as `"{summary}\\n{text}"`, skipping empty parts."""
    parts = [str(p).strip() for p in (summary, text) if p is not None and str(p).strip()]
    return "\n".join(parts) or None


def load_amazon_beauty(data_dir: Path) -> LoadResult:
    """Load All_Beauty 5-core reviews as `review` events.

    Args:
        data_dir: the shared data folder (holding `amazon-beauty-reviews/`) or that folder.

    Returns:
        LoadResult: one `review` event per review (user = reviewerID, item = asin, rating in
        stars 1-5, review_text = summary + body, timestamp from unixReviewTime seconds); one
        CatalogItem per asin titled `Beauty product {asin}` (the dataset has no titles). Row
        numbers are 1-based JSONL lines.

    Raises:
        FileNotFoundError: the file is not there.
    """
    path = resolve_file(data_dir, SUBDIR, FILENAME)
    report = LoadReport(dataset=DATASET)
    sink = RowSink(report)
    asins: dict[str, None] = {}
    with open_text(path) as fh:
        for row, rec in jsonl_rows(fh, report):
            ev = sink.event(
                row,
                user_id=rec.get("reviewerID"),
                item_id=rec.get("asin"),
                event_type="review",
                timestamp=rec.get("unixReviewTime"),
                rating=rec.get("overall"),
                review_text=review_text(rec.get("summary"), rec.get("reviewText")),
            )
            if ev is not None:
                asins.setdefault(ev.item_id)
    for asin in asins:
        sink.item(0, item_id=asin, title=f"Beauty product {asin}")
    report.notes += [
        "no product titles in the data: item title is 'Beauty product <asin>'",
        "review_text is the summary and the review body joined by a newline",
        f"{report.duplicates_collapsed} exact duplicate reviews (same user, item, time, rating, "
        "text) collapsed",
    ]
    return sink.result()
