# Sourced by the GPU examples: the tokenizer spec from $TOKENIZER, or a clear stop.
# The presets are Yuan 2.0's shapes, trained with Yuan's SentencePiece tokenizer (tokenizer.model
# of the released checkpoints); the byte tokenizer would silently train a 384-id vocabulary.
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
