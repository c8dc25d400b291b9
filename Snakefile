# slatflow: raw 3D assets -> TRELLIS training data. See README.md.
from snakemake.utils import min_version, validate

min_version("9.19")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"


rule all:
    default_target: True
    input:
        get_all_targets,
        out("metadata.csv"),


include: "rules/ingest.smk"
include: "rules/metadata.smk"
