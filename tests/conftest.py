import pytest


@pytest.fixture(scope="session")
def manifest(tmp_path_factory):
    """A tiny demo dataset (40 stdlib files, 512-token vocabulary, 32-token windows), built once."""
    import data_pipeline
    return data_pipeline.build_demo(tmp_path_factory.getbasetemp() / "tiny_demo_data", vocab_size=512, seq_len=32,
                                    stdlib_limit=40, progress=False)
