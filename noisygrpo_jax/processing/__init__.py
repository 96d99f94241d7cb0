"""Host-side processing: images and videos to patches, tokenizers, the chat template, input errors."""

from noisygrpo_jax.processing.chat_template import (DEFAULT_SYSTEM_MESSAGE, EncodedChat, encode_chat,
                                                    expand_vision_ids, expand_vision_tokens, render,
                                                    render_segments, vqa_messages)
from noisygrpo_jax.processing.errors import (ImageLoadError, ImageSizeError, ProcessingError, PromptTooLongError,
                                             UnsupportedImageError)
from noisygrpo_jax.processing.image import (ImageInputs, ImageProcessorConfig, VideoInputs, config_from_hf, grid_thw,
                                            load_image, num_image_tokens, patchify, process_image, process_images,
                                            process_video, process_videos, smart_resize, to_rgb, unpatchify,
                                            video_config)
from noisygrpo_jax.processing.tokenizer import (SpecialTokenIds, Tokenizer, load_tokenizer, qwen2_5_tokenizer,
                                                word_level_tokenizer)
