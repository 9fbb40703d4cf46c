def test_tiny_run_fixture_builds(tiny_run):
    assert (tiny_run / "pretrain" / "stage_complete.json").is_file()
