/*
 * LAB STAND-IN for librkllmrt.so (Rockchip RKLLM runtime). NOT the real runtime.
 *
 * It exists so the rkllm.fleet lab can install, verify, switch and roll back a runtime library
 * on containers without an NPU. It exports the C API symbols of RKLLM 1.2.3 (rkllm.h) with the
 * 1.2.x struct layouts, carries its version string the way the real library logs it, and fails
 * every call that would need an NPU. Written for this project from the published API facts.
 *
 * Build: lab/runtime/build.sh (reproducible: same sources and compiler => same bytes).
 */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#ifndef RKLLM_VERSION
#error "build with -DRKLLM_VERSION=\"X.Y.Z\" (see build.sh)"
#endif

#define API __attribute__((visibility("default")))

/* Found by `strings`, like the real library's init log line. */
API const char rkllm_lab_version_banner[] =
    "rkllm-runtime version: " RKLLM_VERSION " (rkllm.fleet lab stand-in, not the Rockchip runtime)";

typedef void *LLMHandle;
typedef int (*LLMResultCallback)(void *result, void *userdata, int state);

/* Layouts as of RKLLM 1.2.3, so callers that pass or receive these by value stay in bounds. */
typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
    bool is_async;
    const char *img_start;
    const char *img_end;
    const char *img_content;
    RKLLMExtendParam extend_param;
    bool use_gpu;
} RKLLMParam;

enum { LAB_ERR = -1 };

API RKLLMParam rkllm_createDefaultParam(void)
{
    RKLLMParam p;
    memset(&p, 0, sizeof(p));
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.extend_param.base_domain_id = 0;
    p.extend_param.n_batch = 1;
    return p;
}

API int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
{
    (void)param;
    (void)callback;
    if (handle)
        *handle = 0;
    return LAB_ERR; /* no NPU in the lab: the real library logs "rkllm_init failed" here */
}

API int rkllm_load_lora(LLMHandle handle, void *lora_adapter) { (void)handle; (void)lora_adapter; return LAB_ERR; }
API int rkllm_load_prompt_cache(LLMHandle handle, const char *path) { (void)handle; (void)path; return LAB_ERR; }
API int rkllm_release_prompt_cache(LLMHandle handle) { (void)handle; return LAB_ERR; }
API int rkllm_destroy(LLMHandle handle) { (void)handle; return 0; }
API int rkllm_run(LLMHandle handle, void *input, void *infer_params, void *userdata)
{
    (void)handle; (void)input; (void)infer_params; (void)userdata;
    return LAB_ERR;
}
API int rkllm_run_async(LLMHandle handle, void *input, void *infer_params, void *userdata)
{
    (void)handle; (void)input; (void)infer_params; (void)userdata;
    return LAB_ERR;
}
API int rkllm_abort(LLMHandle handle) { (void)handle; return LAB_ERR; }
API int rkllm_is_running(LLMHandle handle) { (void)handle; return 0; }
API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos)
{
    (void)handle; (void)keep_system_prompt; (void)start_pos; (void)end_pos;
    return LAB_ERR;
}
API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) { (void)handle; (void)cache_sizes; return LAB_ERR; }
API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix, const char *prompt_postfix)
{
    (void)handle; (void)system_prompt; (void)prompt_prefix; (void)prompt_postfix;
    return LAB_ERR;
}
API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools, const char *tool_response_str)
{
    (void)handle; (void)system_prompt; (void)tools; (void)tool_response_str;
    return LAB_ERR;
}
API int rkllm_set_cross_attn_params(LLMHandle handle, void *cross_attn_params) { (void)handle; (void)cross_attn_params; return LAB_ERR; }
