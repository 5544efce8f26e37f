"""vaepipe infer-spec: print a feature spec (YAML) guessed from the Parquet schema and a sample."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq

from pipeline.errors import InputDataError
from pipeline.io import storage
from pipeline.runtime import add_ray_options, job_main, make_parser
from schemas.feature_spec import infer_spec


def build_parser():
    p = make_parser("vaepipe infer-spec", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--data", required=True, help="Parquet file, directory of shards, or glob (local or s3://)")
    p.add_argument("--sample-rows", type=int, default=50_000, help="rows to read for the guess")
    p.add_argument("--id-columns", nargs="+", default=None, help="columns identifying a record")
    p.add_argument("--out", default=None, help="write the spec here instead of printing it")
    add_ray_options(p)
    return p


def run(args) -> int:
    paths = storage.list_parquet(args.data)
    fs = storage.filesystem(args.data)
    tables, rows = [], 0
    for path in paths:
        uri = storage.to_uri(args.data, path)
        try:
            pf = pq.ParquetFile(path, filesystem=fs)
            for batch in pf.iter_batches(batch_size=min(args.sample_rows, 65536)):
                tables.append(batch)
                rows += batch.num_rows
                if rows >= args.sample_rows:
                    break
        except Exception as e:
            raise InputDataError(f"cannot read Parquet: {e}", file=uri) from e
        if rows >= args.sample_rows:
            break
    import pyarrow as pa

    sample = pa.Table.from_batches(tables)
    text = "# inferred by vaepipe infer-spec from " + args.data + "; review before training\n"
    text += infer_spec(sample, args.id_columns).to_yaml()
    if args.out:
        storage.write_text(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


main = job_main(build_parser, run)

if __name__ == "__main__":
    sys.exit(main())
