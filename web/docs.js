// The interactive API docs at /docs: Swagger UI on this server's own OpenAPI document. No validator
// badge (it would call validator.swagger.io): nothing leaves the server's origin.
window.ui = window.SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
  tryItOutEnabled: false,
  onComplete: () => { document.body.dataset.ready = "true"; },
});
