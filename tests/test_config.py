import pytest

from embedjob.config import ConfigError, build_config, config_help, load_job


def test_defaults_and_overrides(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("input:\n  url: data/x\nencode:\n  dtype: float32\n")
    cfg = load_job(str(spec), ["encode.max_length=64", "input.storage_options.anon=true", "output.url=s3://b/o"])
    assert cfg.input.url == "data/x"
    assert cfg.encode.dtype == "float32"
    assert cfg.encode.max_length == 64
    assert cfg.input.storage_options == {"anon": True}
    assert cfg.output.url == "s3://b/o"


def test_unknown_key_names_key_and_suggests(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("encode:\n  poolng: mean\n")
    with pytest.raises(ConfigError) as e:
        load_job(str(spec))
    msg = str(e.value)
    assert "encode.poolng" in msg and "did you mean 'pooling'" in msg and str(spec) in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown key 'encoder'"):
        build_config({"encoder": {}})


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError) as e:
        build_config({"encode": {"max_length": "long", "pooling": "avg"}, "input": {"rows_per_block": 0}})
    msg = str(e.value)
    assert "encode.max_length" in msg and "encode.pooling" in msg and "input.rows_per_block" in msg


def test_bad_filter_name():
    with pytest.raises(ConfigError, match="unknown filter 'stem'.*stem_text"):
        build_config({"preprocess": {"filters": ["stem"]}})


def test_not_a_mapping(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_job(str(spec))


def test_invalid_yaml(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(str(spec))


def test_every_field_has_help():
    lines = config_help()
    assert lines
    for line in lines:
        assert line.rstrip().split(":", 1)[1].strip(), f"field without help text: {line}"


def test_every_job_spec_in_jobs_loads():
    from pathlib import Path

    from embedjob.config import load_job

    specs = [p for p in sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))
             if p.name not in ("runtime-env.yaml", "kuberay-rayjob.yaml")]
    assert len(specs) >= 4
    for p in specs:
        cfg = load_job(str(p))
        assert cfg.input.url and cfg.output.url, p
