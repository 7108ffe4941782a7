"""The one place that knows InferenceCenter's wire format: frames, codec, validation, errors."""
