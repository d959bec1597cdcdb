"""Audited request-model field lists of SGLang and vLLM, per version range. GENERATED: do not edit.

Regenerate with `python tools/audit_engine_fields.py --download --python > tests/engine_fields_audit.py`.
Each list is read (ast, nothing imported) from the engine's wheel named in *_WHEELS for the versions a
range spans: a range (first, last) means every audited version from first to last has exactly these
fields (unaudited versions in between are assumed to match). Files: SGLang sglang/srt/managers/io_struct.py,
sglang/srt/sampling/sampling_params.py, sglang/api/v1/api_types.py (>= 0.5.22),
sglang/srt/entrypoints/http_server.py (routes); vLLM vllm/entrypoints/openai/[completion/]protocol.py,
vllm/distributed/weight_transfer/nccl_engine.py and nccl_common.py, vllm/entrypoints/**.py (routes).
The file of each model is named next to it. Used by tests/test_rollout_engine_fields.py.
"""
# ruff: noqa: E501
SGLANG_WHEELS = {
    '0.5.2': 'sglang-0.5.2-py3-none-any.whl',
    '0.5.3': 'sglang-0.5.3-py3-none-any.whl',
    '0.5.20': 'sglang-0.5.20-cp311-cp311-manylinux_2_34_x86_64.whl',
    '0.5.21': 'sglang-0.5.21-cp311-cp311-manylinux_2_34_x86_64.whl',
    '0.5.22': 'sglang-0.5.22-cp311-cp311-manylinux_2_34_x86_64.whl',
    '0.5.23': 'sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl',
}
SGLANG_ROUTES = {  # path -> {(first, last): methods}
    '/generate': {('0.5.2', '0.5.23'): 'POST PUT'},
    '/health': {('0.5.2', '0.5.23'): 'GET'},
    '/get_server_info': {('0.5.2', '0.5.23'): 'GET'},
    '/server_info': {('0.5.20', '0.5.23'): 'GET'},
    '/pause_generation': {('0.5.2', '0.5.23'): 'POST'},
    '/continue_generation': {('0.5.2', '0.5.23'): 'POST'},
    '/flush_cache': {('0.5.2', '0.5.23'): 'GET POST'},
    '/update_weights_from_disk': {('0.5.2', '0.5.23'): 'POST'},
    '/init_weights_update_group': {('0.5.2', '0.5.23'): 'POST'},
    '/update_weights_from_distributed': {('0.5.2', '0.5.23'): 'POST'},
    '/destroy_weights_update_group': {('0.5.3', '0.5.23'): 'POST'},
    '/begin_weight_update': {('0.5.21', '0.5.23'): 'POST'},
    '/end_weight_update': {('0.5.21', '0.5.23'): 'POST'},
}
SGLANG_MARKERS = {  # marker -> {(first, last): value}; (file, text) in MARKERS of the tool
    'update_session_required': {('0.5.2', '0.5.20'): False, ('0.5.21', '0.5.23'): True},
    'generate_json_contract': {('0.5.2', '0.5.21'): False, ('0.5.22', '0.5.23'): True},
    'sampling_seed_only_with_deterministic_inference': {('0.5.2', '0.5.2'): False, ('0.5.3', '0.5.23'): True},
}
SGLANG_MODELS = {  # model -> {(first, last): (required, optional)}, space-separated names
    'GenerateReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.2', '0.5.2'): ('',
                         'text input_ids input_embeds image_data video_data audio_data '
                         'sampling_params rid return_logprob logprob_start_len top_logprobs_num '
                         'token_ids_logprob return_text_in_logprobs stream log_metrics '
                         'return_hidden_states modalities session_params lora_path lora_id '
                         'custom_logit_processor bootstrap_host bootstrap_port bootstrap_room '
                         'bootstrap_pair_key data_parallel_rank background conversation_id label '
                         'priority return_bytes'),
        ('0.5.3', '0.5.3'): ('',
                         'rid text input_ids input_embeds image_data video_data audio_data '
                         'sampling_params return_logprob logprob_start_len top_logprobs_num '
                         'token_ids_logprob return_text_in_logprobs stream log_metrics '
                         'return_hidden_states modalities session_params lora_path lora_id '
                         'custom_logit_processor bootstrap_host bootstrap_port bootstrap_room '
                         'bootstrap_pair_key data_parallel_rank background conversation_id priority '
                         'extra_key no_logs custom_labels return_bytes'),
        ('0.5.20', '0.5.20'): ('',
                         'rid session_id text input_ids input_embeds image_data video_data audio_data '
                         'mm_hashes mm_content_hashes use_audio_in_video video_config sampling_params '
                         'return_logprob logprob_start_len top_logprobs_num token_ids_logprob '
                         'return_sampling_mask return_text_in_logprobs return_flat_raw_top_logprobs '
                         'return_flat_raw_top_logprobs_b64 stream log_metrics return_hidden_states '
                         'return_routed_experts routed_experts_start_len return_indexer_topk '
                         'modalities session_params lora_path lora_id custom_logit_processor '
                         'positional_embed_overrides bootstrap_host bootstrap_port bootstrap_room '
                         'bootstrap_pair_key decode_tp_size routed_dp_rank data_parallel_rank '
                         'disagg_prefill_dp_rank routing_key conversation_id http_worker_ipc '
                         'background require_reasoning max_thinking_tokens priority extra_key no_logs '
                         'custom_labels return_bytes return_entropy return_prompt_token_ids '
                         'external_trace_header received_time need_wait_for_mm_inputs '
                         'num_items_assigned encoder_urls max_dynamic_patch min_dynamic_patch '
                         'image_max_dynamic_patch video_max_dynamic_patch images_config '
                         'multi_item_delimiter_indices cache_salt'),
        ('0.5.21', '0.5.21'): ('',
                         'rid session_id text input_ids input_embeds image_data video_data audio_data '
                         'mm_hashes mm_content_hashes use_audio_in_video video_config sampling_params '
                         'return_logprob logprob_start_len top_logprobs_num token_ids_logprob '
                         'return_sampling_mask sampling_logprobs_mode return_text_in_logprobs '
                         'return_flat_raw_top_logprobs return_flat_raw_top_logprobs_b64 stream '
                         'log_metrics return_hidden_states return_routed_experts '
                         'routed_experts_start_len return_indexer_topk modalities session_params '
                         'lora_path lora_id custom_logit_processor positional_embed_overrides '
                         'bootstrap_host bootstrap_port bootstrap_room bootstrap_pair_key '
                         'decode_tp_size routed_dp_rank data_parallel_rank disagg_prefill_dp_rank '
                         'routing_key conversation_id http_worker_ipc background require_reasoning '
                         'max_thinking_tokens priority extra_key no_logs custom_labels return_bytes '
                         'return_entropy return_prompt_token_ids external_trace_header received_time '
                         'need_wait_for_mm_inputs num_items_assigned encoder_urls max_dynamic_patch '
                         'min_dynamic_patch image_max_dynamic_patch video_max_dynamic_patch '
                         'images_config multi_item_delimiter_indices token_indices_to_pool cache_salt '
                         'kv_hints'),
        ('0.5.22', '0.5.22'): ('',
                         'rid session_id text input_ids input_embeds image_data video_data audio_data '
                         'mm_hashes mm_content_hashes use_audio_in_video video_config sampling_params '
                         'watermark return_logprob logprob_start_len top_logprobs_num '
                         'token_ids_logprob return_sampling_mask sampling_logprobs_mode '
                         'return_text_in_logprobs return_flat_raw_top_logprobs '
                         'return_flat_raw_output_top_logprobs return_flat_raw_top_logprobs_b64 stream '
                         'log_metrics return_hidden_states return_routed_experts '
                         'routed_experts_start_len return_indexer_topk modalities session_params '
                         'lora_path lora_id custom_logit_processor positional_embed_overrides '
                         'bootstrap_host bootstrap_port bootstrap_room bootstrap_pair_key '
                         'decode_tp_size routed_dp_rank data_parallel_rank disagg_prefill_dp_rank '
                         'routing_key conversation_id http_worker_ipc background require_reasoning '
                         'max_thinking_tokens priority extra_key no_logs custom_labels return_bytes '
                         'return_entropy return_prompt_token_ids external_trace_header received_time '
                         'need_wait_for_mm_inputs num_items_assigned encoder_urls max_dynamic_patch '
                         'min_dynamic_patch image_max_dynamic_patch video_max_dynamic_patch '
                         'images_config multi_item_delimiter_indices token_indices_to_pool cache_salt '
                         'kv_hints'),
        ('0.5.23', '0.5.23'): ('',
                         'rid session_id text input_ids input_embeds image_data video_data audio_data '
                         'mm_hashes mm_content_hashes use_audio_in_video video_config sampling_params '
                         'watermark return_logprob logprob_start_len top_logprobs_num '
                         'token_ids_logprob return_sampling_mask sampling_logprobs_mode '
                         'return_text_in_logprobs return_flat_raw_top_logprobs '
                         'return_flat_raw_output_top_logprobs return_flat_raw_top_logprobs_b64 stream '
                         'log_metrics return_hidden_states return_routed_experts '
                         'routed_experts_start_len return_indexer_topk modalities session_params '
                         'lora_path lora_id custom_logit_processor positional_embed_overrides '
                         'bootstrap_host bootstrap_port bootstrap_room bootstrap_pair_key '
                         'decode_tp_size routed_dp_rank data_parallel_rank disagg_prefill_dp_rank '
                         'routing_key conversation_id http_worker_ipc background require_reasoning '
                         'max_thinking_tokens priority extra_key no_logs custom_labels return_bytes '
                         'return_entropy return_prompt_token_ids external_trace_header received_time '
                         'need_wait_for_mm_inputs num_items_assigned encoder_urls max_dynamic_patch '
                         'min_dynamic_patch image_max_dynamic_patch video_max_dynamic_patch '
                         'images_config mm_processor_kwargs multi_item_delimiter_indices '
                         'token_indices_to_pool cache_salt kv_hints'),
    },
    'SamplingParams': {  # sglang/srt/sampling/sampling_params.py
        ('0.5.2', '0.5.2'): ('',
                         'max_new_tokens stop stop_token_ids temperature top_p top_k min_p '
                         'frequency_penalty presence_penalty repetition_penalty min_new_tokens n '
                         'json_schema regex ebnf structural_tag ignore_eos skip_special_tokens '
                         'spaces_between_special_tokens no_stop_trim custom_params stream_interval '
                         'logit_bias'),
        ('0.5.3', '0.5.3'): ('',
                         'max_new_tokens stop stop_token_ids temperature top_p top_k min_p '
                         'frequency_penalty presence_penalty repetition_penalty min_new_tokens n '
                         'json_schema regex ebnf structural_tag ignore_eos skip_special_tokens '
                         'spaces_between_special_tokens no_stop_trim custom_params stream_interval '
                         'logit_bias sampling_seed'),
        ('0.5.20', '0.5.21'): ('',
                         'max_new_tokens stop stop_token_ids stop_regex temperature top_p top_k min_p '
                         'frequency_penalty presence_penalty repetition_penalty min_new_tokens n '
                         'beam_width json_schema regex ebnf structural_tag ignore_eos '
                         'skip_special_tokens spaces_between_special_tokens no_stop_trim '
                         'stream_interval logit_bias sampling_seed custom_params stop_strs '
                         'stop_regex_strs stop_str_max_len stop_regex_max_len is_normalized '
                         'ebnf_full_assistant'),
        ('0.5.22', '0.5.23'): ('',
                         'max_new_tokens stop stop_token_ids stop_regex temperature top_p top_k min_p '
                         'frequency_penalty presence_penalty repetition_penalty min_new_tokens n '
                         'beam_width json_schema regex ebnf structural_tag ignore_eos '
                         'skip_special_tokens spaces_between_special_tokens no_stop_trim '
                         'stream_interval logit_bias sampling_seed custom_params watermark stop_strs '
                         'stop_regex_strs stop_str_max_len stop_regex_max_len is_normalized '
                         'ebnf_full_assistant'),
    },
    'api.v1.SamplingParams': {  # sglang/api/v1/api_types.py
        ('0.5.22', '0.5.22'): ('',
                         'max_new_tokens stop stop_token_ids stop_regex temperature top_p top_k min_p '
                         'frequency_penalty presence_penalty repetition_penalty min_new_tokens n '
                         'json_schema regex ebnf structural_tag ignore_eos skip_special_tokens '
                         'spaces_between_special_tokens no_stop_trim stream_interval logit_bias '
                         'sampling_seed custom_params beam_width watermark'),
        ('0.5.23', '0.5.23'): ('',
                         'max_new_tokens stop stop_token_ids stop_regex temperature top_p top_k min_p '
                         'frequency_penalty presence_penalty repetition_penalty min_new_tokens n '
                         'json_schema regex ebnf structural_tag ignore_eos skip_special_tokens '
                         'spaces_between_special_tokens no_stop_trim stream_interval logit_bias '
                         'sampling_seed custom_params beam_width watermark choice'),
    },
    'api.v1.GenerateRequest': {  # sglang/api/v1/api_types.py
        ('0.5.22', '0.5.22'): ('',
                         'rid text input_ids stream sampling_params return_logprob logprob_start_len '
                         'top_logprobs_num token_ids_logprob return_hidden_states '
                         'return_text_in_logprobs bootstrap_host bootstrap_port bootstrap_room '
                         'bootstrap_pair_key decode_tp_size routed_dp_rank disagg_prefill_dp_rank '
                         'image_data mm_hashes video_data audio_data'),
        ('0.5.23', '0.5.23'): ('',
                         'rid text input_ids stream sampling_params return_logprob logprob_start_len '
                         'top_logprobs_num token_ids_logprob return_hidden_states '
                         'return_text_in_logprobs bootstrap_host bootstrap_port bootstrap_room '
                         'bootstrap_pair_key decode_tp_size routed_dp_rank disagg_prefill_dp_rank '
                         'image_data mm_hashes video_data audio_data extra_key priority cache_salt '
                         'require_reasoning lora_path session_params kv_hints routing_key '
                         'max_thinking_tokens session_id custom_logit_processor custom_labels '
                         'images_config return_prompt_token_ids routed_experts_start_len '
                         'return_sampling_mask modalities'),
    },
    'UpdateWeightFromDiskReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.2', '0.5.2'): ('model_path',
                         'load_format abort_all_requests weight_version is_async torch_empty_cache '
                         'keep_pause'),
        ('0.5.3', '0.5.3'): ('model_path',
                         'rid load_format abort_all_requests weight_version is_async '
                         'torch_empty_cache keep_pause'),
        ('0.5.20', '0.5.23'): ('model_path',
                         'rid http_worker_ipc load_format abort_all_requests weight_version is_async '
                         'torch_empty_cache keep_pause recapture_cuda_graph token_step flush_cache '
                         'manifest'),
    },
    'InitWeightsUpdateGroupReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.2', '0.5.2'): ('master_address master_port rank_offset world_size',
                         'group_name backend'),
        ('0.5.3', '0.5.3'): ('master_address master_port rank_offset world_size',
                         'rid group_name backend'),
        ('0.5.20', '0.5.23'): ('master_address master_port rank_offset world_size',
                         'rid http_worker_ipc group_name backend'),
    },
    'UpdateWeightsFromDistributedReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.2', '0.5.2'): ('names dtypes shapes',
                         'group_name flush_cache abort_all_requests weight_version'),
        ('0.5.3', '0.5.3'): ('names dtypes shapes',
                         'rid group_name flush_cache abort_all_requests weight_version'),
        ('0.5.20', '0.5.20'): ('names dtypes shapes',
                         'rid http_worker_ipc group_name flush_cache abort_all_requests '
                         'weight_version load_format torch_empty_cache'),
        ('0.5.21', '0.5.23'): ('names dtypes shapes',
                         'rid http_worker_ipc group_name flush_cache abort_all_requests '
                         'weight_version load_format selector torch_empty_cache'),
    },
    'DestroyWeightsUpdateGroupReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.3', '0.5.3'): ('',
                         'rid group_name'),
        ('0.5.20', '0.5.23'): ('',
                         'rid http_worker_ipc group_name'),
    },
    'PauseGenerationReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.20', '0.5.23'): ('',
                         'rid http_worker_ipc mode'),
    },
    'ContinueGenerationReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.20', '0.5.23'): ('',
                         'rid http_worker_ipc torch_empty_cache'),
    },
    'BeginWeightUpdateReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.21', '0.5.23'): ('',
                         'rid http_worker_ipc selector'),
    },
    'EndWeightUpdateReqInput': {  # sglang/srt/managers/io_struct.py
        ('0.5.21', '0.5.23'): ('',
                         'rid http_worker_ipc'),
    },
}
SGLANG_TYPES = {  # model -> {(first, last): {field: annotation}} for the fields the adapters send
    'GenerateReqInput': {
        ('0.5.2', '0.5.3'): {
            'input_ids': 'Optional[Union[List[List[int]], List[int]]]',
            'sampling_params': 'Optional[Union[List[Dict], Dict]]',
            'return_logprob': 'Optional[Union[List[bool], bool]]',
        },
        ('0.5.20', '0.5.23'): {
            'input_ids': 'Annotated[Optional[Union[List[List[int]], List[int]]], PlainValidator(validate_optional_list_i64_1d_2d)]',
            'sampling_params': 'Optional[Union[List[Dict[str, Any]], Dict[str, Any]]]',
            'return_logprob': 'Optional[Union[List[bool], bool]]',
        },
    },
    'SamplingParams': {
        ('0.5.2', '0.5.2'): {
            'max_new_tokens': 'int',
            'stop_token_ids': 'Optional[List[int]]',
            'temperature': 'float',
            'top_p': 'float',
            'top_k': 'int',
            'skip_special_tokens': 'bool',
        },
        ('0.5.3', '0.5.3'): {
            'max_new_tokens': 'int',
            'stop_token_ids': 'Optional[List[int]]',
            'temperature': 'float',
            'top_p': 'float',
            'top_k': 'int',
            'skip_special_tokens': 'bool',
            'sampling_seed': 'int',
        },
        ('0.5.20', '0.5.23'): {
            'max_new_tokens': 'Optional[int]',
            'stop_token_ids': 'Optional[Set[int]]',
            'temperature': 'float',
            'top_p': 'float',
            'top_k': 'int',
            'skip_special_tokens': 'bool',
            'sampling_seed': 'Optional[int]',
        },
    },
    'api.v1.SamplingParams': {
        ('0.5.22', '0.5.23'): {
            'max_new_tokens': 'Optional[int]',
            'stop_token_ids': 'Optional[Int64List]',
            'temperature': 'Optional[float]',
            'top_p': 'Optional[float]',
            'top_k': 'Optional[int]',
            'skip_special_tokens': 'Optional[bool]',
            'sampling_seed': 'Optional[int]',
        },
    },
    'api.v1.GenerateRequest': {
        ('0.5.22', '0.5.23'): {
            'input_ids': 'Optional[TokenIdsOrList]',
            'sampling_params': 'Optional[SamplingParamsOrList]',
            'return_logprob': 'Optional[BoolOrList]',
        },
    },
    'UpdateWeightFromDiskReqInput': {
        ('0.5.2', '0.5.3'): {
            'model_path': 'str',
            'weight_version': 'Optional[str]',
        },
        ('0.5.20', '0.5.23'): {
            'model_path': 'str',
            'weight_version': 'Optional[str]',
            'flush_cache': 'bool',
        },
    },
    'InitWeightsUpdateGroupReqInput': {
        ('0.5.2', '0.5.23'): {
            'master_address': 'str',
            'master_port': 'int',
            'rank_offset': 'int',
            'world_size': 'int',
            'group_name': 'str',
            'backend': 'str',
        },
    },
    'UpdateWeightsFromDistributedReqInput': {
        ('0.5.2', '0.5.23'): {
            'names': 'List[str]',
            'dtypes': 'List[str]',
            'shapes': 'List[List[int]]',
            'group_name': 'str',
            'flush_cache': 'bool',
            'weight_version': 'Optional[str]',
        },
    },
    'DestroyWeightsUpdateGroupReqInput': {
        ('0.5.3', '0.5.23'): {
            'group_name': 'str',
        },
    },
    'PauseGenerationReqInput': {
    },
    'ContinueGenerationReqInput': {
    },
    'BeginWeightUpdateReqInput': {
    },
    'EndWeightUpdateReqInput': {
    },
}

VLLM_WHEELS = {
    '0.10.2': 'vllm-0.10.2-cp38-abi3-manylinux1_x86_64.whl',
    '0.15.0': 'vllm-0.15.0-cp38-abi3-manylinux_2_31_x86_64.whl',
    '0.16.0': 'vllm-0.16.0-cp38-abi3-manylinux_2_31_x86_64.whl',
    '0.17.0': 'vllm-0.17.0-cp38-abi3-manylinux_2_31_x86_64.whl',
    '0.20.2': 'vllm-0.20.2-cp38-abi3-manylinux_2_35_x86_64.whl',
    '0.21.0': 'vllm-0.21.0-1-cp38-abi3-manylinux_2_24_x86_64.whl',
    '0.27.1': 'vllm-0.27.1-cp38-abi3-manylinux_2_28_x86_64.whl',
    '0.28.0': 'vllm-0.28.0-cp38-abi3-manylinux_2_28_x86_64.whl',
    '0.32.0': 'vllm-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl',
}
VLLM_ROUTES = {  # path -> {(first, last): methods}
    '/v1/completions': {('0.10.2', '0.32.0'): 'POST'},
    '/v1/models': {('0.10.2', '0.32.0'): 'GET'},
    '/version': {('0.10.2', '0.32.0'): 'GET'},
    '/health': {('0.10.2', '0.32.0'): 'GET'},
    '/pause': {('0.15.0', '0.32.0'): 'POST'},
    '/resume': {('0.15.0', '0.32.0'): 'POST'},
    '/collective_rpc': {('0.10.2', '0.32.0'): 'POST'},
    '/reset_prefix_cache': {('0.10.2', '0.32.0'): 'POST'},
    '/init_weight_transfer_engine': {('0.16.0', '0.32.0'): 'POST'},
    '/start_weight_update': {('0.21.0', '0.32.0'): 'POST'},
    '/update_weights': {('0.16.0', '0.32.0'): 'POST'},
    '/finish_weight_update': {('0.21.0', '0.32.0'): 'POST'},
}
VLLM_MARKERS = {  # marker -> {(first, last): value}; (file, text) in MARKERS of the tool
    'start_weight_update_required': {('0.10.2', '0.20.2'): False, ('0.21.0', '0.32.0'): True},
    'legacy_trainer_init': {('0.10.2', '0.15.0'): False, ('0.16.0', '0.27.1'): True, ('0.28.0', '0.32.0'): False},
    'legacy_trainer_send_weights_args': {('0.10.2', '0.16.0'): False, ('0.17.0', '0.27.1'): True, ('0.28.0', '0.32.0'): False},
    'engine_trainer_class': {('0.10.2', '0.27.1'): False, ('0.28.0', '0.32.0'): True},
    'nccl_common_trainer_init': {('0.10.2', '0.21.0'): False, ('0.27.1', '0.32.0'): True},
    'reload_weights_takes_weights_path': {('0.10.2', '0.15.0'): False, ('0.16.0', '0.32.0'): True},
}
VLLM_MODELS = {  # model -> {(first, last): (required, optional)}, space-separated names
    'CompletionRequest': {  # vllm/entrypoints/openai/completion/protocol.py, vllm/entrypoints/openai/protocol.py
        ('0.10.2', '0.10.2'): ('',
                         'model prompt prompt_embeds best_of echo frequency_penalty logit_bias '
                         'logprobs max_tokens n presence_penalty seed stop stream stream_options '
                         'suffix temperature top_p user use_beam_search top_k min_p '
                         'repetition_penalty length_penalty stop_token_ids include_stop_str_in_output '
                         'ignore_eos min_tokens skip_special_tokens spaces_between_special_tokens '
                         'truncate_prompt_tokens allowed_token_ids prompt_logprobs add_special_tokens '
                         'response_format guided_json guided_regex guided_choice guided_grammar '
                         'guided_decoding_backend guided_whitespace_pattern priority request_id '
                         'logits_processors return_tokens_as_token_ids return_token_ids cache_salt '
                         'kv_transfer_params vllm_xargs _DEFAULT_SAMPLING_PARAMS'),
        ('0.15.0', '0.16.0'): ('',
                         'model prompt echo frequency_penalty logit_bias logprobs max_tokens n '
                         'presence_penalty seed stop stream stream_options suffix temperature top_p '
                         'user use_beam_search top_k min_p repetition_penalty length_penalty '
                         'stop_token_ids include_stop_str_in_output ignore_eos min_tokens '
                         'skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens '
                         'allowed_token_ids prompt_logprobs prompt_embeds add_special_tokens '
                         'response_format structured_outputs priority request_id logits_processors '
                         'return_tokens_as_token_ids return_token_ids cache_salt kv_transfer_params '
                         'vllm_xargs _DEFAULT_SAMPLING_PARAMS'),
        ('0.17.0', '0.21.0'): ('',
                         'model prompt echo frequency_penalty logit_bias logprobs max_tokens n '
                         'presence_penalty seed stop stream stream_options suffix temperature top_p '
                         'user use_beam_search top_k min_p repetition_penalty length_penalty '
                         'stop_token_ids include_stop_str_in_output ignore_eos min_tokens '
                         'skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens '
                         'allowed_token_ids prompt_logprobs prompt_embeds add_special_tokens '
                         'response_format structured_outputs priority request_id '
                         'return_tokens_as_token_ids return_token_ids cache_salt kv_transfer_params '
                         'vllm_xargs repetition_detection _DEFAULT_SAMPLING_PARAMS'),
        ('0.27.1', '0.27.1'): ('',
                         'model prompt echo frequency_penalty logit_bias logprobs max_tokens n '
                         'presence_penalty seed stop stream stream_options suffix temperature top_p '
                         'user use_beam_search top_k min_p repetition_penalty length_penalty '
                         'stop_token_ids include_stop_str_in_output ignore_eos min_tokens '
                         'skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens '
                         'truncation_side allowed_token_ids prompt_logprobs logprob_token_ids '
                         'bad_words prompt_embeds add_special_tokens response_format '
                         'structured_outputs priority request_id return_tokens_as_token_ids '
                         'return_token_ids return_token_offsets cache_salt kv_transfer_params '
                         'ec_transfer_params vllm_xargs repetition_detection thinking_token_budget '
                         'stream_interval _DEFAULT_SAMPLING_PARAMS'),
        ('0.28.0', '0.28.0'): ('',
                         'model prompt echo frequency_penalty logit_bias logprobs max_tokens n '
                         'presence_penalty seed stop stream stream_options suffix temperature top_p '
                         'user use_beam_search top_k min_p repetition_penalty length_penalty '
                         'stop_token_ids include_stop_str_in_output ignore_eos min_tokens '
                         'skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens '
                         'truncation_side allowed_token_ids prompt_logprobs logprob_token_ids '
                         'bad_words prompt_embeds add_special_tokens response_format '
                         'structured_outputs priority request_id session_id '
                         'return_tokens_as_token_ids return_token_ids routed_experts_prompt_start '
                         'return_token_offsets cache_salt kv_transfer_params ec_transfer_params '
                         'vllm_xargs repetition_detection thinking_token_budget stream_interval '
                         '_DEFAULT_SAMPLING_PARAMS'),
        ('0.32.0', '0.32.0'): ('',
                         'model prompt echo frequency_penalty logit_bias logprobs max_tokens n '
                         'presence_penalty seed stop stream stream_options suffix temperature top_p '
                         'user use_beam_search top_k min_p repetition_penalty watermarking '
                         'length_penalty stop_token_ids include_stop_str_in_output ignore_eos '
                         'min_tokens skip_special_tokens spaces_between_special_tokens '
                         'truncate_prompt_tokens truncation_side allowed_token_ids prompt_logprobs '
                         'logprob_token_ids bad_words prompt_embeds add_special_tokens '
                         'response_format structured_outputs priority request_id session_id '
                         'return_tokens_as_token_ids return_token_ids routed_experts_prompt_start '
                         'return_token_offsets mm_payload return_mm_kwargs cache_salt '
                         'kv_transfer_params ec_transfer_params vllm_xargs repetition_detection '
                         'thinking_token_budget stream_interval _DEFAULT_SAMPLING_PARAMS'),
    },
    'CompletionResponse': {  # vllm/entrypoints/openai/completion/protocol.py, vllm/entrypoints/openai/protocol.py
        ('0.10.2', '0.20.2'): ('model choices usage',
                         'id object created service_tier system_fingerprint kv_transfer_params'),
        ('0.21.0', '0.21.0'): ('model choices usage',
                         'id object created prompt_routed_experts service_tier system_fingerprint '
                         'kv_transfer_params'),
        ('0.27.1', '0.32.0'): ('model choices usage',
                         'id object created service_tier system_fingerprint kv_transfer_params '
                         'ec_transfer_params metrics'),
    },
    'CompletionResponseChoice': {  # vllm/entrypoints/openai/completion/protocol.py, vllm/entrypoints/openai/protocol.py
        ('0.10.2', '0.20.2'): ('index text',
                         'logprobs finish_reason stop_reason token_ids prompt_logprobs '
                         'prompt_token_ids'),
        ('0.21.0', '0.32.0'): ('index text',
                         'logprobs finish_reason stop_reason token_ids prompt_logprobs '
                         'prompt_token_ids routed_experts'),
    },
    'CompletionLogProbs': {  # vllm/entrypoints/openai/completion/protocol.py, vllm/entrypoints/openai/protocol.py
        ('0.10.2', '0.32.0'): ('',
                         'text_offset token_logprobs tokens top_logprobs'),
    },
    'NCCLWeightTransferInitInfo': {  # vllm/distributed/weight_transfer/nccl_common.py, vllm/distributed/weight_transfer/nccl_engine.py
        ('0.16.0', '0.27.1'): ('master_address master_port rank_offset world_size',
                         ''),
        ('0.28.0', '0.28.0'): ('master_address master_port rank_offset world_size',
                         'packed packed_buffer_size_bytes packed_num_buffers'),
        ('0.32.0', '0.32.0'): ('rank_offset world_size',
                         'master_address master_port nccl_unique_id_b64 packed '
                         'packed_buffer_size_bytes packed_num_buffers'),
    },
    'NCCLWeightTransferUpdateInfo': {  # vllm/distributed/weight_transfer/nccl_engine.py
        ('0.16.0', '0.20.2'): ('names dtype_names shapes',
                         'is_checkpoint_format packed packed_buffer_size_bytes packed_num_buffers'),
        ('0.21.0', '0.27.1'): ('names dtype_names shapes',
                         'packed packed_buffer_size_bytes packed_num_buffers'),
        ('0.28.0', '0.32.0'): ('names dtype_names shapes',
                         ''),
    },
    'NCCLTrainerSendWeightsArgs': {  # vllm/distributed/weight_transfer/nccl_engine.py
        ('0.17.0', '0.27.1'): ('group',
                         'src post_iter_func packed stream packed_buffer_size_bytes '
                         'packed_num_buffers'),
    },
    'GPUModelRunner#reload_weights': {  # vllm/v1/worker/gpu_model_runner.py
        ('0.10.2', '0.15.0'): ('',
                         ''),
        ('0.16.0', '0.32.0'): ('',
                         'weights_iterator weights_path is_checkpoint_format'),
    },
}
VLLM_TYPES = {  # model -> {(first, last): {field: annotation}} for the fields the adapters send
    'CompletionRequest': {
        ('0.10.2', '0.10.2'): {
            'model': 'Optional[str]',
            'prompt': 'Optional[Union[list[int], list[list[int]], str, list[str]]]',
            'logprobs': 'Optional[int]',
            'max_tokens': 'Optional[int]',
            'n': 'int',
            'seed': 'Optional[int]',
            'temperature': 'Optional[float]',
            'top_p': 'Optional[float]',
            'top_k': 'Optional[int]',
            'stop_token_ids': 'Optional[list[int]]',
            'skip_special_tokens': 'bool',
            'return_tokens_as_token_ids': 'Optional[bool]',
            'return_token_ids': 'Optional[bool]',
        },
        ('0.15.0', '0.16.0'): {
            'model': 'str | None',
            'prompt': 'list[int] | list[list[int]] | str | list[str] | None',
            'logprobs': 'int | None',
            'max_tokens': 'int | None',
            'n': 'int',
            'seed': 'int | None',
            'temperature': 'float | None',
            'top_p': 'float | None',
            'top_k': 'int | None',
            'stop_token_ids': 'list[int] | None',
            'skip_special_tokens': 'bool',
            'return_tokens_as_token_ids': 'bool | None',
            'return_token_ids': 'bool | None',
        },
        ('0.17.0', '0.32.0'): {
            'model': 'str | None',
            'prompt': 'list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]] | str | list[str] | None',
            'logprobs': 'int | None',
            'max_tokens': 'int | None',
            'n': 'int',
            'seed': 'int | None',
            'temperature': 'float | None',
            'top_p': 'float | None',
            'top_k': 'int | None',
            'stop_token_ids': 'list[int] | None',
            'skip_special_tokens': 'bool',
            'return_tokens_as_token_ids': 'bool | None',
            'return_token_ids': 'bool | None',
        },
    },
    'CompletionResponse': {
        ('0.10.2', '0.32.0'): {
            'model': 'str',
            'choices': 'list[CompletionResponseChoice]',
            'usage': 'UsageInfo',
        },
    },
    'CompletionResponseChoice': {
        ('0.10.2', '0.10.2'): {
            'index': 'int',
            'text': 'str',
            'logprobs': 'Optional[CompletionLogProbs]',
            'finish_reason': 'Optional[str]',
            'token_ids': 'Optional[list[int]]',
        },
        ('0.15.0', '0.32.0'): {
            'index': 'int',
            'text': 'str',
            'logprobs': 'CompletionLogProbs | None',
            'finish_reason': 'str | None',
            'token_ids': 'list[int] | None',
        },
    },
    'CompletionLogProbs': {
        ('0.10.2', '0.10.2'): {
            'token_logprobs': 'list[Optional[float]]',
            'tokens': 'list[str]',
        },
        ('0.15.0', '0.32.0'): {
            'token_logprobs': 'list[float | None]',
            'tokens': 'list[str]',
        },
    },
    'NCCLWeightTransferInitInfo': {
        ('0.16.0', '0.27.1'): {
            'master_address': 'str',
            'master_port': 'int',
            'rank_offset': 'int',
            'world_size': 'int',
        },
        ('0.28.0', '0.28.0'): {
            'master_address': 'str',
            'master_port': 'int',
            'rank_offset': 'int',
            'world_size': 'int',
            'packed': 'bool',
        },
        ('0.32.0', '0.32.0'): {
            'master_address': 'str | None',
            'master_port': 'int | None',
            'rank_offset': 'int',
            'world_size': 'int',
            'packed': 'bool',
        },
    },
    'NCCLWeightTransferUpdateInfo': {
        ('0.16.0', '0.27.1'): {
            'names': 'list[str]',
            'dtype_names': 'list[str]',
            'shapes': 'list[list[int]]',
            'packed': 'bool',
        },
        ('0.28.0', '0.32.0'): {
            'names': 'list[str]',
            'dtype_names': 'list[str]',
            'shapes': 'list[list[int]]',
        },
    },
    'NCCLTrainerSendWeightsArgs': {
        ('0.17.0', '0.27.1'): {
            'group': 'Any',
            'packed': 'bool',
        },
    },
    'GPUModelRunner#reload_weights': {
        ('0.16.0', '0.32.0'): {
            'weights_path': 'str | None',
        },
    },
}
