from slatflow.ingest import SourceConfig, source_fingerprint


checkpoint ingest_manifest:
    input:
        unpack(get_ingest_inputs),
    output:
        manifest=out("manifest.csv"),
    log:
        out("logs/ingest_manifest.log"),
    localrule: True
    conda:
        "../envs/base.yaml"
    params:
        # A cheap digest of names, sizes and mtimes: new or changed files re-run ingest.
        source_state=lambda wildcards: source_fingerprint(
            SourceConfig.from_config(config["source"])
        ),
    script:
        "../scripts/ingest_manifest.py"
