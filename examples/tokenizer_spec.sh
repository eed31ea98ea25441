# Sourced by the GPU examples: the tokenizer spec from $TOKENIZER, or a clear stop.
# The ids of DATA_PREFIX must come from the tokenizer the run uses, so the examples ask for it
# rather than assume the presets' copy of Yuan's tokenizer.model.
if [ -z "${TOKENIZER:-}" ]; then
  echo "TOKENIZER is not set: point it at Yuan 2.0's tokenizer.model (the one DATA_PREFIX was" \
    "preprocessed with, e.g. TOKENIZER=/models/Yuan2-2B-hf/tokenizer.model), or give a spec" \
    "(sentencepiece:PATH, huggingface:DIR; byte for a smoke test)" >&2
  exit 2
fi
case "$TOKENIZER" in
  byte | sentencepiece:* | huggingface:*) tokenizer_spec=$TOKENIZER ;;
  *) tokenizer_spec=sentencepiece:$TOKENIZER ;;
esac
if [ "$tokenizer_spec" != byte ] && [ ! -e "${tokenizer_spec#*:}" ]; then
  echo "TOKENIZER: ${tokenizer_spec#*:} not found; give the path of Yuan 2.0's tokenizer.model" >&2
  exit 2
fi
