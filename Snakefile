# slatflow: raw 3D assets -> TRELLIS training data. See README.md.
import sys
import time

from snakemake.utils import min_version, validate

from slatflow.config import check_config
from slatflow.quarantine import failure_summary

min_version("9.19")

RUN_STARTED = time.time()  # the end-of-run summary lists the failures of this run


configfile: "config/config.yaml"


check_config(config, workflow.source_path("config/schema.yaml"))  # one line per error
validate(config, "config/schema.yaml")  # fills in the defaults


include: "rules/common.smk"


rule all:
    default_target: True
    input:
        get_all_targets,
        out("metadata.csv"),
        out("report/quality_report.html"),


include: "rules/ingest.smk"
include: "rules/metadata.smk"
include: "rules/download.smk"
include: "rules/render.smk"
include: "rules/voxelize.smk"
include: "rules/geometry.smk"
include: "rules/features.smk"
include: "rules/latents.smk"


onerror:
    print(failure_summary(OUT, since=RUN_STARTED), file=sys.stderr)
