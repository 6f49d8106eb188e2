"""Write small slices of the real datasets into tests/fixtures/, mirroring ../shared/data.

Each fixture is a few hundred real lines plus a few hand-made hostile lines (marked SYNTHETIC
below), so the loader tests can assert exact, hand-computed counts per drop reason. Output is
deterministic (gzip mtime 0). Every file stays well under 100 KB.

    python scripts/make_fixtures.py [--data-dir ../shared/data] [--out tests/fixtures]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        return fh.read().splitlines()


def _write(path: Path, lines: list[str], *, trailing_newline: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    data = text.encode("utf-8")
    if path.suffix == ".gz":
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            gz.write(data)
        data = buf.getvalue()
    path.write_bytes(data)
    assert len(data) < 100_000, f"{path} is {len(data)} bytes; fixtures must stay < 100 KB"
    print(f"wrote {path} ({len(data):,} bytes, {len(lines)} lines)")


def _csv_line(fields: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue()


def online_retail(src: Path, out: Path) -> None:
    lines = _read_lines(src / "online-retail" / "online_retail.csv.gz")
    header, data = lines[0], lines[1:]
    rows = [next(csv.reader([line])) for line in data]

    def first(pred) -> str:  # the first real line (by file order) matching pred
        return next(data[i] for i, r in enumerate(rows) if pred(r))

    def edit(i: int, **changes: str) -> str:  # SYNTHETIC: real row i (1-based) with edits
        cols = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate",
                "UnitPrice", "CustomerID", "Country"]
        r = dict(zip(cols, rows[i - 1], strict=True))
        r.update(changes)
        return _csv_line([r[c] for c in cols])

    out_lines = [header, *data[:300]]  # rows 1-300: 290 clean, 9 cancellations, 1 POST
    out_lines += [
        first(lambda r: r[6] == ""),  # 301 real: missing CustomerID
        edit(1, Description=""),  # 302 SYNTHETIC: missing Description
        first(lambda r: r[6] and float(r[5]) <= 0),  # 303 real: zero UnitPrice
        first(lambda r: r[6] and r[1] == "C2"),  # 304 real: carriage (non-product)
        edit(6, Quantity="-3"),  # 305 SYNTHETIC: negative quantity, not a C invoice
        data[1],  # 306: exact duplicate of row 2
        edit(3, CustomerID="17850.0"),  # 307 SYNTHETIC: float id -> duplicate of row 3
        edit(4, InvoiceDate="1899-12-31 10:00"),  # 308 SYNTHETIC: impossible date
        edit(5, InvoiceDate="31/31/2011 99:99"),  # 309 SYNTHETIC: unparseable date
        first(lambda r: r[6] and r[4].startswith("2011-06-01 10:")),  # 310 real: BST row
        edit(1, Description="CREAM HANGING HEART T-LIGHT HOLDER", Quantity="7"),  # 311 SYNTH
        "536999,22222,ONLY THREE FIELDS",  # 312 SYNTHETIC: malformed line
    ]
    _write(out / "online-retail" / "online_retail.csv.gz", out_lines)


def taobao(src: Path, out: Path) -> None:
    lines = _read_lines(src / "taobao-userbehavior" / "UserBehavior_head84k.csv")
    out_lines = [*lines[:120]]  # rows 1-120, real
    out_lines += [lines[4170], lines[7990], lines[7991]]  # rows 121-123: outside the window
    out_lines += [
        "999999999,1,2,buy,1511544070000",  # 124 SYNTHETIC: milliseconds
        "999999999,3,4,pv,12345",  # 125 SYNTHETIC: 1970, impossible
        "999999999,5,6,like,1511544070",  # 126 SYNTHETIC: unknown behaviour
        lines[-1],  # 127 real: the truncated last line
    ]
    _write(out / "taobao-userbehavior" / "UserBehavior_head84k.csv", out_lines,
           trailing_newline=False)


def amazon_beauty(src: Path, out: Path) -> None:
    lines = _read_lines(src / "amazon-beauty-reviews" / "All_Beauty_5.jsonl.gz")
    seen: dict[str, int] = {}
    dup = next(line for line in lines[150:] if line in seen or seen.setdefault(line, 0))
    good = json.loads(lines[0])
    out_lines = [*lines[:150]]  # rows 1-150, real
    out_lines += [
        dup, dup,  # 151-152 real: a review that appears twice in the real file
        json.dumps({**good, "overall": 7.0, "reviewerID": "SYNTHETIC"}),  # 153: rating 7
        "not json at all",  # 154 SYNTHETIC
    ]
    _write(out / "amazon-beauty-reviews" / "All_Beauty_5.jsonl.gz", out_lines)


def amazon_games(src: Path, out: Path) -> None:
    folder = src / "amazon-games"
    inter = _read_lines(folder / "Games-6k.test.inter.gz")
    kept = inter[:31]  # header + the first 30 users
    wanted = {"11", "37"}  # titles with HTML entities (&amp; and &rsquo;)
    for line in kept[1:]:
        _, hist, target = line.split("\t")
        wanted.update(hist.split())
        wanted.add(target)
    items = _read_lines(folder / "Games.item")
    _write(out / "amazon-games" / "Games.item",
           [items[0], *(ln for ln in items[1:] if ln.split("\t")[0] in wanted)])
    _write(out / "amazon-games" / "Games-6k.test.inter.gz", kept)
    _write(out / "amazon-games" / "Games-6k.random.gz",
           _read_lines(folder / "Games-6k.random.gz")[:3])
    for name in ("Games.random", "Games.rabmbepobpgrsa_3"):
        _write(out / "amazon-games" / "Games-200" / name,
               _read_lines(folder / "Games-200" / name)[:3])


def amazon_industrial(src: Path, out: Path) -> None:
    folder = src / "amazon-industrial"
    split_files = {s: sorted(folder.glob(f"{s}_*.csv.gz"))[0] for s in ("valid", "test")}
    tables = {s: _read_lines(p) for s, p in split_files.items()}
    users_of = {s: [next(csv.reader([ln]))[0] for ln in t[1:]] for s, t in tables.items()}
    test_only = [u for u in dict.fromkeys(users_of["test"]) if u not in set(users_of["valid"])]
    # A1749: in both splits; A4042, A5382: the first valid users; two test-only users.
    users = {"A1749", "A4042", "A5382", *test_only[:2]}
    wanted: set[str] = set()
    for split, table in tables.items():
        keep = [table[0]]
        for line, user in zip(table[1:], users_of[split], strict=True):
            if user in users:
                keep.append(line)
                r = next(csv.reader([line]))
                wanted.update(x.strip() for x in r[3].strip("[]").split(",") if x.strip())
                wanted.add(r[4])
        _write(out / "amazon-industrial" / split_files[split].name, keep)
    with gzip.open(folder / "Industrial_and_Scientific.item.json.gz", "rt") as fh:
        items = json.load(fh)
    subset = {k: v for k, v in items.items() if k in wanted}
    _write(out / "amazon-industrial" / "Industrial_and_Scientific.item.json.gz",
           json.dumps(subset, indent=2).splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"{args.data_dir} not found: the real data lives in ../shared/data")
    for make in (online_retail, taobao, amazon_beauty, amazon_games, amazon_industrial):
        make(args.data_dir, args.out)


if __name__ == "__main__":
    main()
