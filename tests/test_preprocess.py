import pyarrow as pa

from embedjob.stages.encode import EncoderSettings
from embedjob.stages.preprocess import PreprocessConfig, Preprocessor, preprocess_texts


def test_default_chain_matches_gensim():
    from gensim.parsing.preprocessing import preprocess_string

    texts = ["The <b>cats</b> were running, quickly! In 2024 they ran 3 miles.", None, "   "]
    out = preprocess_texts(texts, PreprocessConfig())
    assert out[0] == preprocess_string(texts[0])
    assert out[1] == [] and out[2] == []


def test_custom_chain_and_stopwords():
    cfg = PreprocessConfig(filters=["lower", "strip_punctuation", "remove_stopwords"], extra_stopwords=["cats"])
    assert preprocess_texts(["The cats, the DOGS."], cfg) == [["dogs"]]


def test_batch_transform_without_ray(minilm_path):
    settings = EncoderSettings(model_path=minilm_path, max_length=16)
    pre = Preprocessor(PreprocessConfig(), "text", encoder_settings=settings)
    out = pre(pa.table({"id": ["a", "b"], "text": ["Hello cats and dogs", None]}))
    assert out.column("tokens").to_pylist()[1] == []
    assert out.column("_empty").to_pylist() == [False, True]
    ids = out.column("_input_ids").to_pylist()
    assert ids[0][0] == 101 and ids[0][-1] == 102 and ids[1] == []
