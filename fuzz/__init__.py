"""Fuzzers (atheris, libFuzzer) of the decoders that read untrusted bytes.

- `fuzz.events`: `EventCodec.decode_uploaded` and `decode_suggestion` on arbitrary Kafka
  values: nothing but `EventDecodeError` with a known reason may come out, and what
  decodes survives a re-encode unchanged.
- `fuzz.images`: the image path of the service, `sniff_format` then `decode_image` at the
  service's default limits: nothing but `ImageDecodeError` with a known reason, the
  sniffer and the decoder agree, the array has the model's shape, and one decode stays
  under 2 s of CPU.

`python -m fuzz` seeds both from the hostile-input corpus (tests/corpus) and runs them; see
`fuzz/__main__.py`. A crashing input is saved under build/fuzz/<target>/crashes/ and
replays with `python -m fuzz.<target> <file>`.
"""
