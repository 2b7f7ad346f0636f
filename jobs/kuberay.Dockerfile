# Image for jobs/kuberay-rayjob.yaml: Ray 2.60 (CUDA base) with embedjob and its job specs.
#   docker build -f jobs/kuberay.Dockerfile -t REGISTRY/embedjob:0.1.0-gpu .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/embedjob
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users embedjob ./embedjob
COPY --chown=ray:users jobs ./jobs
# torch from PyPI is the CUDA build; ray is already in the image at the same version.
RUN pip install --no-cache-dir "ray[default,data,train]==2.60.0" . \
    && python -c "import embedjob, torch, ray; print(embedjob.__version__, torch.__version__, ray.__version__)"
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
