"""vaepipe query: SQL over the scores table (all published partitions, named `scores`), local or s3://.

Examples::

    vaepipe query out/scores "SELECT record_id, elbo FROM scores ORDER BY elbo LIMIT 10"
    vaepipe query out/scores "SELECT dt, count(*) AS n, avg(elbo) FROM scores GROUP BY dt" --format csv
    vaepipe query s3://bucket/scores "SELECT * FROM scores WHERE dt = '2026-11-23'" --format parquet --out x.parquet

The table has the contract's columns plus ``dt`` (the run date, a string). ``column_log_density`` is a
struct: ``column_log_density.income`` in DuckDB (the default engine) and in polars. The data is read
through Arrow (pyarrow's S3 filesystem for s3://), so DuckDB needs no extension and only the columns
and partitions the query touches are read.
"""

from __future__ import annotations

import io
import json
import math
import sys

import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.io import storage
from pipeline.runtime import job_main, make_parser
from pipeline.score import iceberg, reader

FORMATS = ("table", "csv", "json", "parquet")
ENGINES = ("duckdb", "polars")


def build_parser():
    p = make_parser("vaepipe query", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("output", metavar="OUTPUT_URI", help="the scores table: the --output of vaepipe score")
    p.add_argument("sql", metavar="SQL", help="a query over the table `scores`")
    p.add_argument("--format", choices=FORMATS, default="table", help="how to print or write the result")
    p.add_argument("--out", default=None, help="write the result to this file (local or s3://) instead of stdout")
    p.add_argument("--engine", choices=ENGINES, default="duckdb", help="SQL engine")
    p.add_argument("--max-rows", type=int, default=50, help="--format table: rows shown (the rest are summarised)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")
    iceberg.add_options(p)  # --table-format parquet|iceberg, --catalog, --table
    return p


def run_sql(uri: str, sql: str, engine: str = "duckdb", table_format: str = "parquet", catalog=None, table=None):
    """Run `sql` over the scores table at `uri` (Parquet, or the Iceberg table `table`); an Arrow table."""
    if table_format == "iceberg":
        dataset = iceberg.read_table(uri, catalog, table or iceberg.DEFAULT_TABLE)
    else:
        dataset = reader.open_scores(uri)
    if engine == "duckdb":
        import duckdb

        con = duckdb.connect()
        try:
            con.register("scores", dataset)
            return con.sql(sql).to_arrow_table()
        except duckdb.Error as e:
            raise UsageError(f"SQL error (duckdb): {e}") from e
        finally:
            con.close()
    import polars as pl

    try:
        frame = pl.from_arrow(dataset).lazy() if isinstance(dataset, pa.Table) else pl.scan_pyarrow_dataset(dataset)
        ctx = pl.SQLContext(scores=frame)
        return ctx.execute(sql).collect().to_arrow()
    except (pl.exceptions.PolarsError, ValueError) as e:  # SQLSyntaxError etc. derive from PolarsError
        raise UsageError(f"SQL error (polars): {e}") from e


# ---- formatting -----------------------------------------------------------------------------------
def _nested(t: pa.DataType) -> bool:
    return pa.types.is_nested(t)


def _json_safe(v):
    if isinstance(v, float):
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def to_json(table: pa.Table) -> str:
    """A JSON array of row objects; NaN and infinities become null (JSON has no such numbers)."""
    rows = [_json_safe(r) for r in table.to_pylist()]
    return json.dumps(rows, allow_nan=False, indent=None, separators=(",", ":")) + "\n"


def to_csv(table: pa.Table) -> str:
    """CSV with a header; lists and structs are written as JSON text in their cell."""
    import pyarrow.csv as pcsv

    cols = []
    for col in table.columns:
        if _nested(col.type):
            col = pa.array(
                [None if v is None else json.dumps(_json_safe(v), allow_nan=False) for v in col.to_pylist()],
                pa.string(),
            )
        cols.append(col)
    buf = io.BytesIO()
    pcsv.write_csv(pa.table(cols, names=table.column_names), buf)
    return buf.getvalue().decode()


def to_text_table(table: pa.Table, max_rows: int) -> str:
    import polars as pl

    df = pl.from_arrow(table)
    with pl.Config(
        tbl_rows=max_rows,
        tbl_cols=-1,
        tbl_width_chars=240,
        fmt_str_lengths=60,
        fmt_table_cell_list_len=4,
        tbl_hide_dataframe_shape=True,
    ):
        text = str(df)
    return f"{text}\n({table.num_rows} row{'s' if table.num_rows != 1 else ''})\n"


def to_parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def run(args) -> int:
    if args.format == "parquet" and not args.out:
        raise UsageError("--format parquet needs --out FILE")
    result = run_sql(args.output, args.sql, args.engine, args.table_format, args.catalog, args.table)
    if args.format == "parquet":
        storage.write_bytes(args.out, to_parquet_bytes(result))
        print(f"wrote {result.num_rows} rows to {args.out}", file=sys.stderr)
        return 0
    text = {
        "table": lambda t: to_text_table(t, args.max_rows),
        "csv": to_csv,
        "json": to_json,
    }[args.format](result)
    if args.out:
        storage.write_text(args.out, text)
        print(f"wrote {result.num_rows} rows to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
