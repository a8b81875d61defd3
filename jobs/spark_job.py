"""Entry point for ``spark-submit``:

```
spark-submit --master spark://HEAD:7077 --py-files mmcurate.zip \
    "$(python -c 'import mmcurate.jobs.spark_job as j; print(j.__file__)')" pipeline.yaml [--set KEY=VALUE ...]
```
The session comes from spark-submit's configuration (master, executors); the Spark engine
uses it instead of starting ``local[N]``.
"""

from __future__ import annotations

import sys

from pyspark.sql import SparkSession

from mmcurate.cli import main


def run(argv: list[str]) -> int:
    spark = SparkSession.builder.appName("mmcurate").getOrCreate()
    try:
        return main(["run", *argv[:1], "--engine", "spark", *argv[1:]])
    finally:
        spark.stop()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
