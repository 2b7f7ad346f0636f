import pyarrow as pa

from embedjob.stages.encode import EncoderSettings
from embedjob.stages.preprocess import PreprocessConfig, Preprocessor, preprocess_texts


def test_default_chain_is_gensims_without_stemming():
    """Real lower-cased words by default (word vectors keyed by them: kv["people"]); gensim's own
    chain, stemming included, when asked for."""
    from gensim.parsing.preprocessing import preprocess_string

    texts = ["The <b>cats</b> were running, quickly! In 2024 People ran 3 miles.", None, "   "]
    out = preprocess_texts(texts, PreprocessConfig())
    assert out[0] == ["cats", "running", "quickly", "people", "ran", "miles"]
    assert out[1] == [] and out[2] == []
    stemmed = PreprocessConfig(filters=PreprocessConfig().filters + ["stem_text"])
    assert preprocess_texts(texts, stemmed)[0] == preprocess_string(texts[0]) == [
        "cat", "run", "quickli", "peopl", "ran", "mile"]


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
