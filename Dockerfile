# The image docker-compose.yml runs: pgqueue and its example tasks.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pgqueue ./pgqueue
COPY sql ./sql
# pgqueue/_sql is a link to ../sql in the repository; make it a real folder in the image
RUN rm -f pgqueue/_sql && cp -r sql pgqueue/_sql && pip install --no-cache-dir .
ENTRYPOINT ["pgqueue"]
